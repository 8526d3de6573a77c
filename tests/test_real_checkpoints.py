"""The recipes on the processor files real checkpoints ship (../shared/real-checkpoints), around tiny random weights
(scripts/make_tiny_model.py --processor_from: the real vocabulary, special-token ids, patch and merge sizes).

What a user of those checkpoints would see, checked end to end:
- the card's plain launch (no --config_file, no accelerate default config) trains under the shared ZeRO-3 offload
  config, and a LLaVA-1.5 fine-tuned on one-word answers answers in one word and then stops (its template writes no
  end token after an answer; the recipes append and label the EOS);
- --max_pixels / --video_max_pixels hold on every Qwen layout (top-level min/max_pixels, `size`, 16-px patches);
- a micro-batch with an image and a video on one rank and images only on the other trains under ZeRO-3;
- a frozen vision tower runs no backward.
"""

import importlib.util
import json
import sys

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from tests.conftest import (
    NUM_PROCESSES,
    REPO,
    free_port,
    launch_recipe,
    logged_losses,
    run_command,
    with_precision,
)
from tests.real_checkpoints import real_folder, requires_real
from vlm_recipes.collator import ConversationCollator
from vlm_recipes.config import load_recipe
from vlm_recipes.masking import IGNORE_INDEX, media_tokens_for, tokenize_conversation
from vlm_recipes.training import input_grads_only_where_trained, set_requires_grad

QWEN_LAYOUTS = ["qwen2-vl-7b-instruct", "qwen2.5-vl-7b-instruct", "qwen3-vl-8b-instruct"]


def user(text, kind=None):
    return {"role": "user", "content": ([{"type": kind}] if kind else []) + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


# ---- the tiny models keep what matters of the real checkpoints --------------------------------------------------


@requires_real("llava-1.5-7b-hf", *QWEN_LAYOUTS)
@pytest.mark.parametrize("name", ["llava-1.5-7b-hf", *QWEN_LAYOUTS])
def test_tiny_model_keeps_the_real_vocabulary_token_ids_and_image_tokens(tiny_real, name):
    from transformers import AutoConfig

    path = tiny_real(name)
    real, tiny = AutoConfig.from_pretrained(real_folder(name)), AutoConfig.from_pretrained(path)
    assert tiny.text_config.vocab_size == real.text_config.vocab_size
    assert tiny.image_token_id == real.image_token_id and tiny.text_config.hidden_size == 64
    assert tiny.vision_config.patch_size == real.vision_config.patch_size
    processor = AutoProcessor.from_pretrained(path)
    image = Image.new("RGB", (448, 336))
    sample = tokenize_conversation(processor, [user("What?", "image"), assistant("red")], [image])
    model = AutoModelForImageTextToText.from_pretrained(path)
    batch = ConversationCollator(processor)([sample])
    loss = model(**batch).loss  # the image features and image tokens line up
    assert torch.isfinite(loss)
    expected = media_tokens_for(AutoProcessor.from_pretrained(real_folder(name)), "image", 448, 336)
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == expected


# ---- pixel caps: through the recipe's own code, on every real layout ---------------------------------------------


# (tokens of a 3000x2000 image as the checkpoint ships, under --max_pixels 802816, per token in pixels)
PIXEL_CAP_CASES = {
    "qwen2-vl-7b-instruct": (7597, 1014, 28 * 28),
    "qwen2.5-vl-7b-instruct": (7597, 1014, 28 * 28),
    "qwen3-vl-8b-instruct": (5828, 748, 32 * 32),
}


@requires_real(*QWEN_LAYOUTS)
@pytest.mark.parametrize("name", QWEN_LAYOUTS)
def test_pixel_caps_hold_on_every_real_layout_for_images_and_videos(name):
    recipe = load_recipe(REPO / "recipes" / "qwen_vl.py")
    from vlm_recipes.config import ModelArguments

    model_args = ModelArguments(model_name_or_path=str(real_folder(name)))
    uncapped, capped, pixels_per_token = PIXEL_CAP_CASES[name]
    as_shipped = recipe.load_processor(model_args, recipe.QwenImageArguments())
    assert media_tokens_for(as_shipped, "image", 3000, 2000) == uncapped
    caps = recipe.QwenImageArguments(max_pixels=802816, video_max_pixels=401408)
    processor = recipe.load_processor(model_args, caps)
    assert media_tokens_for(processor, "image", 3000, 2000) == capped <= 802816 // pixels_per_token
    assert media_tokens_for(processor, "video", 3000, 2000) <= 401408 // pixels_per_token
    assert media_tokens_for(as_shipped, "video", 3000, 2000) > 401408 // pixels_per_token
    # the image cap leaves videos alone, and the other way round
    images_only = recipe.load_processor(model_args, recipe.QwenImageArguments(max_pixels=802816))
    assert media_tokens_for(images_only, "video", 3000, 2000) == media_tokens_for(
        as_shipped, "video", 3000, 2000
    )


# ---- mixed media under ZeRO-3 -----------------------------------------------------------------------------------


@requires_real("qwen2.5-vl-7b-instruct")
def test_guard_rows_give_every_batch_each_kind_and_keep_the_loss(tiny_real):
    path = tiny_real("qwen2.5-vl-7b-instruct")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    image, frames = Image.new("RGB", (56, 84), "red"), [Image.new("RGB", (56, 56), "blue")] * 2
    samples = [
        tokenize_conversation(processor, [user("Colour?", "image"), assistant("red")], [image]),
        tokenize_conversation(processor, [user("Say left.", None), assistant("left")], []),
    ]
    video = tokenize_conversation(processor, [user("What?", "video"), assistant("blue")], [], videos=[frames])
    both = ConversationCollator(processor, media_kinds=("image", "video"))
    images_only = ConversationCollator(processor, guard_text_only_batches=False)
    guarded = both(samples)
    assert "pixel_values_videos" in guarded and guarded["input_ids"].shape[0] == 3
    assert (guarded["labels"][2] == IGNORE_INDEX).all()
    assert both([*samples, video])["input_ids"].shape[0] == 3  # it has both kinds already: no guard row
    with torch.no_grad():
        torch.testing.assert_close(
            model(**guarded).loss, model(**images_only(samples)).loss, rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("llava-1.5-7b-hf (real files)", marks=requires_real("llava-1.5-7b-hf")),
        "llava (ours)",
        "chexagent (ours)",
    ],
)
def test_text_only_batch_of_llava_and_chexagent_gets_a_blank_image_and_keeps_the_loss(
    tiny_real, tiny_model, source
):
    # Qwen's guard is tested above and in test_qwen_vl_recipe.py; these run their vision tower once per batch too.
    name = source.split(" ")[0]
    path = tiny_real(name) if "real" in source else tiny_model(name)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    samples = [tokenize_conversation(processor, [user("Say left.", None), assistant("left")], [])] * 2
    guarded = ConversationCollator(processor)(samples)
    assert guarded["input_ids"].shape[0] == 3 and (guarded["labels"][2] == IGNORE_INDEX).all()
    assert guarded["pixel_values"].shape[0] == 1  # the vision tower runs on this rank too
    unguarded = ConversationCollator(processor, guard_text_only_batches=False)(samples)
    assert "pixel_values" not in unguarded
    with torch.no_grad():
        torch.testing.assert_close(model(**guarded).loss, model(**unguarded).loss, rtol=1e-6, atol=1e-6)


def write_mixed_media_data(folder):
    """Four records in order: [big image, video] for rank 0 and [image, image] for rank 1 (sequential sampling,
    2 per micro-batch); the big image is 3000x2000, more tokens than max_length unless --max_pixels holds."""

    def picture(size, colour):  # fmt: skip
        image = Image.new("RGB", size, (128, 128, 128))
        ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=colour)
        return image

    picture((3000, 2000), "red").save(folder / "big.png")
    for k, colour in enumerate(["blue", "green"]):
        picture((112, 84), colour).save(folder / f"small{k}.png")
    for k in range(4):
        picture((84, 84), (60 * k, 0, 0)).save(folder / f"frame{k}.png")

    def record(key, media, question, answer):  # fmt: skip
        placeholder = "<image>" if key == "image" else "<video>"
        return {key: media, "conversations": [{"from": "human", "value": f"{placeholder}\n{question}"},
                                              {"from": "gpt", "value": answer}]}  # fmt: skip

    records = [
        record("image", "big.png", "What colour is the circle?", "red"),
        record("video", [f"frame{k}.png" for k in range(4)], "What happens?", "it gets red"),
        record("image", "small0.png", "What colour is the circle?", "blue"),
        record("image", "small1.png", "What colour is the circle?", "green"),
    ]
    (folder / "mixed.json").write_text(json.dumps(records))
    return folder / "mixed.json"


@pytest.mark.distributed
@pytest.mark.gpu_e2e
@requires_real("qwen2.5-vl-7b-instruct")
def test_image_and_video_on_one_rank_images_on_the_other_train_under_zero3_with_the_pixel_cap(
    tiny_real, tmp_path
):
    if NUM_PROCESSES < 2:
        pytest.skip("the ranks' micro-batches differ only with 2+ processes")
    dataset = write_mixed_media_data(tmp_path)
    output_dir = tmp_path / "out"
    result = launch_recipe("qwen_vl.py", [
        "--config", "recipes/configs/qwen_vl_demo.yaml", "--model_name_or_path", tiny_real("qwen2.5-vl-7b-instruct"),
        "--dataset_path", dataset, "--image_root", tmp_path, "--output_dir", output_dir,
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--train_sampling_strategy", "sequential", "--logging_steps", "1", "--max_length", "1100",
        "--max_pixels", "802816",
    ])  # fmt: skip
    losses = logged_losses(output_dir)
    assert sorted(losses) == [1, 2] and all(loss == loss for loss in losses.values())
    # the 3000x2000 image went in at the cap: under max_length 1100, not the 7,597 tokens of the shipped setting
    assert "preflight: all 4 records" in result.stdout
    assert "resizes each into 3,136..802,816 pixels" in result.stdout


# ---- the card's plain launch; a LLaVA-1.5 that learns to stop -----------------------------------------------------

ANSWER_WORDS = {"red", "green", "blue", "yellow", "left", "right"}


def generated_tokens(model, processor, image, question) -> list[int]:
    """What plain `generate` writes after the prompt, as a user would call it (greedy, up to 8 tokens)."""
    messages = [user(question, "image")]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.distributed
@pytest.mark.gpu_e2e
@requires_real("llava-1.5-7b-hf")
def test_plain_launch_uses_the_shared_config_and_llava_learns_to_stop(
    tiny_real, demo_data, tmp_path, monkeypatch
):
    output_dir = tmp_path / "out"
    # 8 samples a step however many processes the launch starts: with one GPU's single process at 4 a step, 24 steps
    # left the model at the stage where it writes the commonest label, </s>, first (make test-gpu on one H200)
    per_device_batch = max(8 // NUM_PROCESSES, 1)
    empty_home = tmp_path / "hf_home"  # no saved accelerate default config can be found here
    empty_home.mkdir()
    # `accelerate launch recipes/llava.py`, as the card says; with several devices accelerate starts one process per
    # device by itself (--multi_gpu), which on a CPU-only machine is asked for explicitly.
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        *(["--multi_gpu", "--num_processes", NUM_PROCESSES] if NUM_PROCESSES > 1 else []),
        "--main_process_port", free_port(), REPO / "recipes" / "llava.py", *with_precision([
            "--config", "recipes/configs/llava_demo.yaml", "--model_name_or_path", tiny_real("llava-1.5-7b-hf"),
            "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", output_dir,
            "--max_steps", "24", "--per_device_train_batch_size", per_device_batch, "--learning_rate", "1e-2",
            "--warmup_steps", "3", "--logging_steps", "4", "--max_length", "700",
        ]),
    ]  # fmt: skip
    monkeypatch.setenv("HF_HOME", str(empty_home))  # run_command passes the environment to the launch
    result = run_command(command)
    config = json.loads((output_dir / "ds_config_resolved.json").read_text())
    zero = config["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    )
    assert config["train_batch_size"] == per_device_batch * NUM_PROCESSES
    assert "(deepspeed in recipes/configs/llava_demo.yaml)" in result.stderr

    processor = AutoProcessor.from_pretrained(output_dir)
    model = LlavaForConditionalGeneration.from_pretrained(output_dir).eval()
    eos = processor.tokenizer.eos_token_id
    records = json.loads((demo_data / "test.json").read_text())
    endings = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        with torch.no_grad():
            tokens = generated_tokens(
                model, processor, Image.open(demo_data / record["image"]).convert("RGB"), question
            )
        endings.append(tokens)
    # one answer word, then </s>: the model stops where LLaVA's own training taught it to
    stopped = [
        tokens for tokens in endings
        if eos in tokens and processor.tokenizer.decode(tokens[: tokens.index(eos)]).strip() in ANSWER_WORDS
    ]  # fmt: skip
    assert len(stopped) == len(endings), [processor.tokenizer.convert_ids_to_tokens(t) for t in endings]


# ---- a frozen vision tower runs no backward ----------------------------------------------------------------------


def vision_backward_calls(model, tower, batch) -> int:
    """Backward calls through the tower's frozen Linear layers in one training step with reentrant checkpointing, turned
    on the Trainer's way (scripts/device/frozen_tower_backward.py measures the same at real size on a GPU)."""
    spec = importlib.util.spec_from_file_location(
        "frozen", REPO / "scripts" / "device" / "frozen_tower_backward.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.measure(model, tower, batch, steps=0)["tower_backward_calls_per_step"]


# (tower, what projects its features into the language model, a Linear layer inside the tower's first block)
TOWERS = {
    "llava-1.5-7b-hf": ("model.vision_tower", "model.multi_modal_projector", "encoder.layers.0.self_attn.q_proj"),
    "qwen2.5-vl-7b-instruct": ("model.visual", "model.visual.merger", "blocks.0.attn.qkv"),
}  # fmt: skip


@requires_real("llava-1.5-7b-hf", "qwen2.5-vl-7b-instruct")
@pytest.mark.parametrize("name", TOWERS)
def test_frozen_vision_tower_runs_no_backward_and_what_trains_gets_gradients(tiny_real, name):
    tower_path, projector_path, block_linear = TOWERS[name]
    path = tiny_real(name)
    processor = AutoProcessor.from_pretrained(path)
    sample = tokenize_conversation(
        processor, [user("Colour?", "image"), assistant("red")], [Image.new("RGB", (84, 56))]
    )
    batch = ConversationCollator(processor)([sample])

    def prepared(ours: bool, train_language_model: bool = True, train_in_tower: str | None = None):
        """The recipes' freezing: the tower frozen, the projector (Qwen: the merger, inside the tower) trained."""
        model = AutoModelForImageTextToText.from_pretrained(path)
        tower = model.get_submodule(tower_path)
        set_requires_grad(tower, False)
        set_requires_grad(model.get_submodule(projector_path), True)
        set_requires_grad(model.model.language_model, train_language_model)
        set_requires_grad(model.lm_head, train_language_model)
        if (
            train_in_tower
        ):  # as LoRA on the vision blocks would: something to train inside a checkpointed block
            set_requires_grad(tower.get_submodule(train_in_tower), True)
        if ours:
            input_grads_only_where_trained(model)
        return model, tower

    def trained_parameters_got_gradients(model) -> bool:
        trained = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
        return bool(trained) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)

    model, tower = prepared(ours=False)
    assert (
        vision_backward_calls(model, tower, batch) > 0
    )  # transformers' own hooks: backward through the frozen tower
    model, tower = prepared(ours=True)
    assert vision_backward_calls(model, tower, batch) == 0
    assert trained_parameters_got_gradients(model)  # language model, projector / merger
    # projector only (LLaVA's stage 1): backward still runs through the frozen language model to the projector
    model, tower = prepared(ours=True, train_language_model=False)
    assert vision_backward_calls(model, tower, batch) == 0
    assert trained_parameters_got_gradients(model)
    # one Linear of the first vision block trained: the tower's input must carry gradients again
    model, tower = prepared(ours=True, train_in_tower=block_linear)
    assert vision_backward_calls(model, tower, batch) > 0
    assert trained_parameters_got_gradients(model)


@requires_real("qwen2.5-vl-7b-instruct")
def test_validator_applies_the_pixel_caps_on_the_real_qwen_files(tmp_path, run_in_process):
    Image.new("RGB", (3000, 2000)).save(tmp_path / "big.png")
    record = {"image": "big.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "red"}]}  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps([record]))
    command = ["scripts/validate_data.py", "--model_name_or_path", real_folder("qwen2.5-vl-7b-instruct"),
               "--dataset_path", tmp_path / "data.json", "--image_root", tmp_path, "--max_length", "1100"]  # fmt: skip
    outcome, _, err = run_in_process(*command)
    assert outcome == "SystemExit: 1" and "7597 of them image or video tokens" in err
    outcome, out, err = run_in_process(*command, "--min_pixels", "3136", "--max_pixels", "802816")
    assert outcome == "finished", (outcome, err[-2000:])
    assert "resizes each into 3,136..802,816 pixels" in out


# ---- LLaVA-NeXT and OneVision on their real processor configs and templates ---------------------------------------

ANY_RESOLUTION = ["llava-v1.6-mistral-7b-hf", "llava-onevision-qwen2-7b-ov-hf"]


def tiny_any_resolution_around_real(name: str, folder, tmp_path_factory):
    """A tiny random model saved with the real checkpoint's image processor config, processor config and chat
    template (its tile size, grid pinpoints and token counts), a stand-in tokenizer with the real special tokens
    (no tokenizer files are found for these: tests/test_real_templates.py) and the real vision geometry
    (CLIP 336/14 for NeXT, SigLIP 384/14 for OneVision) at tiny width and depth."""
    import shutil

    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from tests.test_real_templates import STAND_INS, byte_level_tokenizer

    real = real_folder(name)
    for file in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copy(real / file, folder / file)
    if name.startswith("llava-v1.6"):
        tokenizer = STAND_INS[name](tmp_path_factory).tokenizer
        tokenizer.chat_template = None  # the processor's chat_template.jinja is the one that counts
    else:  # OneVision's special tokens on a byte vocabulary: Qwen2's 151k-token output layer would not fit a CPU step
        named = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        tokenizer = byte_level_tokenizer(named, ["<|im_start|>", "<image>", "<video>"], add_bos=False)
    tokenizer.save_pretrained(folder)
    pinpoints = json.loads((real / "preprocessor_config.json").read_text())["image_grid_pinpoints"]
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if name.startswith("llava-v1.6"):
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision, image_size=336), text_config=MistralConfig(**text),
            image_token_index=image_id, image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )  # fmt: skip
    else:
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision, image_size=384), text_config=Qwen2Config(**text),
            image_token_index=image_id, video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    return folder


@requires_real(*ANY_RESOLUTION, "qwen2.5-vl-7b-instruct")
def test_next_and_onevision_count_their_real_tiles_and_train_a_mixed_batch(tmp_path_factory):
    """On the real processor configs: the image tokens of the YAMLs' comments (NeXT up to 2,928 an image; OneVision
    up to 7,371 for one image, 730 for each image of a two-image sample, 196 a video frame), and one training step
    of the tiny model on a micro-batch mixing tile counts, a two-image sample and a text-only guard row, through the
    recipe's collator: a finite loss, and gradients reaching the projector and image_newline."""
    from vlm_recipes.masking import image_tokens_at_cap

    measured = {}
    for name in ANY_RESOLUTION:
        folder = tiny_any_resolution_around_real(name, tmp_path_factory.mktemp(name), tmp_path_factory)
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        ask = [user("What colour is the circle?", "image"), assistant("red")]
        two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
               assistant("yes")]  # fmt: skip
        measured[name] = {
            "at cap": image_tokens_at_cap(processor),
            "672x672": media_tokens_for(processor, "image", 672, 672),
            "300x900": media_tokens_for(processor, "image", 300, 900),
            "two images": int((tokenize_conversation(processor, two, [Image.new("RGB", (200, 200))] * 2)["input_ids"]
                               == processor.image_token_id).sum()),
        }  # fmt: skip
        if "onevision" in name:
            measured[name]["4-frame video"] = media_tokens_for(processor, "video", 384, 384, frames=4)
        # small images, so that the tiny model's step stays small on a CPU: still 1 to 3 tiles each
        samples = [
            tokenize_conversation(processor, ask, [Image.new("RGB", (60, 60), "red")]),
            tokenize_conversation(processor, ask, [Image.new("RGB", (40, 100), "red")]),
            tokenize_conversation(processor, two, [Image.new("RGB", (50, 50)), Image.new("RGB", (60, 40))]),
            tokenize_conversation(processor, [user("Say yes."), assistant("yes")], []),
        ]
        batch = ConversationCollator(processor)(samples)
        assert batch["pixel_values"].shape[0] == 4  # one row per image, tiles padded to the most
        assert batch["image_sizes"].tolist()[:2] == [[60, 60], [100, 40]]
        loss = model(**batch).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert model.model.image_newline.grad.abs().sum() > 0
        assert all(p.grad is not None for p in model.model.multi_modal_projector.parameters())
    assert measured == {
        # NeXT: a 576-token overview + a 2x2, 1x3 or 1x2 grid of 24x24 tiles, unpadded to the image's shape, with
        # image_newline after each row: 576 + 48 x 49; 576 + 72 x 25; 2 x (576 + 24 x 25).
        "llava-v1.6-mistral-7b-hf": {"at cap": 2928, "672x672": 2928, "300x900": 2376, "two images": 2352},
        # OneVision: 729 + a 6x6 grid of 27x27 tiles pooled to 81 x 81 (at most 9 tiles' worth) + newlines; a 2x2
        # grid, 729 + 54 x 55; a 1x3 grid, 729 + 81 x 28; each image of two, its overview + one newline; a video,
        # 14 x 14 pooled tokens a frame + one newline.
        "llava-onevision-qwen2-7b-ov-hf": {"at cap": 7371, "672x672": 3699, "300x900": 2997, "two images": 1460,
                                           "4-frame video": 4 * 196 + 1},
    }, measured  # fmt: skip
