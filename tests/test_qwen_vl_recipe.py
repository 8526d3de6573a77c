"""The Qwen-VL recipe: label masks on the real Qwen chat layout, end-to-end 2-process ZeRO-3 offload runs of
tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL (loss falls, saved model equals the trained weights), LoRA, pixel caps
through the recipe's code, and the mixed text-only / image batch guard. tests/test_real_checkpoints.py runs the
recipe on the real checkpoints' processor files. The tiny Qwen2.5-VL run also runs on CUDA in bf16 and fp16
(`make test-gpu`, marked gpu_e2e)."""

import json
import math
import os
import re
import subprocess
import time

import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.conftest import (
    NUM_PROCESSES,
    QUIET_ENV,
    REPO,
    assert_planner_counts_what_the_run_trained,
    assert_resolved_like_arguments,
    assert_saved_equals_trained,
    assistant,
    labelled_spans,
    launch_recipe,
    logged_losses,
    recipe_command,
    requires_processes,
    user,
)
from vlm_recipes.collator import ConversationCollator
from vlm_recipes.masking import IGNORE_INDEX, tokenize_conversation

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_follow_the_qwen_chat_layout(tiny_model, family):
    processor = AutoProcessor.from_pretrained(tiny_model(family))
    messages = [
        user("What color is the shape?", images=1),
        assistant("red"),
        user("And the side?"),
        assistant("left"),
    ]
    sample = tokenize_conversation(processor, messages, [Image.new("RGB", (64, 64), "red")])
    text = processor.tokenizer.decode(sample["input_ids"])
    # Default system turn, one vision span of 4 image tokens (64x64 -> 56x56 -> 4x4 patches -> 2x2 merged).
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert (
        "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>What color is the shape?<|im_end|>" in text
    )
    # Only the answers and their <|im_end|> are labelled; the "\n" after <|im_end|> and the headers are not.
    assert labelled_spans(processor, sample) == ["red<|im_end|>", "left<|im_end|>"]
    image_positions = sample["input_ids"] == processor.image_token_id
    assert sample["mm_token_type_ids"].tolist() == image_positions.long().tolist()
    assert tuple(sample["image_grid_thw"].tolist()[0]) == (1, 4, 4)


def test_pixel_caps_set_the_number_of_image_tokens(tiny_model):
    """Through the recipe's own load_processor (tests/test_real_checkpoints.py does the same on the real files)."""
    from vlm_recipes.config import ModelArguments, load_recipe

    recipe = load_recipe(REPO / "recipes" / "qwen_vl.py")
    model_args = ModelArguments(model_name_or_path=str(tiny_model("qwen2.5-vl")))
    image, messages = Image.new("RGB", (200, 200)), [user("What?", images=1), assistant("x")]
    counts = {}
    for max_pixels in (3136, 12544):  # 56x56 -> 4 tokens; 112x112 -> 16 tokens
        caps = recipe.QwenImageArguments(min_pixels=784, max_pixels=max_pixels)
        processor = recipe.load_processor(model_args, caps)
        sample = tokenize_conversation(processor, messages, [image])
        counts[max_pixels] = int((sample["input_ids"] == processor.image_token_id).sum())
    assert counts == {3136: 4, 12544: 16}


def test_text_only_batch_guard_keeps_the_loss(tiny_model):
    path = tiny_model("qwen2.5-vl")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    samples = [
        tokenize_conversation(processor, [user("Say hello."), assistant("hello")], []),
        tokenize_conversation(processor, [user("Say the word left please."), assistant("left")], []),
    ]
    plain = ConversationCollator(processor, guard_text_only_batches=False)(samples)
    guarded = ConversationCollator(processor)(samples)
    assert "pixel_values" not in plain and guarded["pixel_values"].shape[0] > 0
    assert guarded["input_ids"].shape[0] == 3 and (guarded["labels"][2] == IGNORE_INDEX).all()
    with torch.no_grad():
        torch.testing.assert_close(model(**guarded).loss, model(**plain).loss, rtol=1e-6, atol=1e-6)


def test_video_as_frames_trains(tiny_model, tmp_path):
    from vlm_recipes.data import ConversationDataset, load_records, media_kinds

    for k in range(4):
        Image.new("RGB", (64, 64), (60 * k, 0, 0)).save(tmp_path / f"frame{k}.png")
    frames = [f"frame{k}.png" for k in range(4)]
    records = [
        {"id": "frames", "video": frames, "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "it gets red"}]},
    ]  # fmt: skip
    (tmp_path / "videos.json").write_text(json.dumps(records))
    path = tiny_model("qwen2.5-vl")
    processor = AutoProcessor.from_pretrained(path)
    dataset = ConversationDataset(load_records(str(tmp_path / "videos.json"), str(tmp_path)), processor, 256)
    sample = dataset[0]
    assert int((sample["input_ids"] == processor.video_token_id).sum()) == 8  # 4 frames -> 2 x 2x2 tokens
    assert media_kinds(dataset) == ("video",)
    batch = ConversationCollator(processor, media_kinds=media_kinds(dataset))([sample])
    assert "pixel_values" not in batch  # video-only data: every batch holds a video already, no guard row
    model = AutoModelForImageTextToText.from_pretrained(path)
    # a few optimizer steps on the video sample: its loss falls, and the gradients reach through the video path
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        # the frames went through the tower
        assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.9 * losses[0], losses


def failing_video_decoder(monkeypatch):
    """torchcodec as if installed, failing on the file as it does on one that is not a video."""
    import transformers.video_processing_utils as processing
    import transformers.video_utils as video_utils

    def decode(*args, **kwargs):
        raise RuntimeError("Could not open input file: Invalid data found when processing input")

    monkeypatch.setattr(processing, "is_torchcodec_usable", lambda *args, **kwargs: True)
    monkeypatch.setattr(video_utils, "is_torchcodec_available", lambda: True)
    monkeypatch.setitem(video_utils.VIDEO_DECODERS, "torchcodec", decode)


@pytest.mark.parametrize("decoder", ["as installed here", "one that fails on the file"])
def test_a_video_file_that_cannot_be_decoded_names_the_record(tiny_model, tmp_path, monkeypatch, decoder):
    """Whichever way decoding fails (no decoder installed: ImportError; torchcodec or decord on a broken file:
    RuntimeError; PyAV: its ValueError), the error names the record and the run's preflight can list it."""
    from vlm_recipes.data import ConversationDataset, DataError, load_records

    if decoder == "one that fails on the file":
        failing_video_decoder(monkeypatch)
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    records = [
        {"id": "file", "videos": ["clip.mp4"], "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "nothing"}]},
    ]  # fmt: skip
    (tmp_path / "videos.json").write_text(json.dumps(records))
    processor = AutoProcessor.from_pretrained(tiny_model("qwen2.5-vl"))
    dataset = ConversationDataset(load_records(str(tmp_path / "videos.json"), str(tmp_path)), processor, 256)
    with pytest.raises(DataError, match=r"videos.json, record #0 \(id file\)"):
        dataset[0]


def test_a_video_whose_frames_differ_in_size_names_the_record_and_the_sizes(tiny_model, tmp_path):
    """A frame-list video is one array per video: frames of two sizes are refused with the sizes, not numpy's
    "all input arrays must have the same shape"."""
    from vlm_recipes.data import ConversationDataset, DataError, load_records

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    Image.new("RGB", (96, 40)).save(tmp_path / "b.png")
    records = [
        {"id": "mixed", "video": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "nothing"}]},
    ]  # fmt: skip
    (tmp_path / "videos.json").write_text(json.dumps(records))
    processor = AutoProcessor.from_pretrained(tiny_model("qwen2.5-vl"))
    dataset = ConversationDataset(load_records(str(tmp_path / "videos.json"), str(tmp_path)), processor, 256)
    with pytest.raises(DataError, match=r"record #0 \(id mixed\).*video 1 have 2 sizes \(64x64, 96x40\)"):
        dataset[0]


def recipe_args(model_dir, demo_data, output_dir, *extra):
    return [
        "--config", "recipes/configs/qwen_vl_demo.yaml",
        "--model_name_or_path", model_dir,
        "--dataset_path", demo_data / "train.json", "--image_root", demo_data,
        "--output_dir", output_dir, "--overwrite_output_dir", "false",
        *extra,
    ]  # fmt: skip


FULL_FINETUNE_MARKS = {"qwen2.5-vl": pytest.mark.gpu_e2e, "qwen2-vl": pytest.mark.extended}


@pytest.mark.distributed
@pytest.mark.parametrize(
    "family",
    # Qwen2-VL's vision tower is Qwen2.5-VL's without window attention: its run is in `make test-extended`.
    [pytest.param(family, marks=FULL_FINETUNE_MARKS.get(family, ())) for family in FAMILIES],
)
def test_full_finetune_two_processes(tiny_model, demo_data, tmp_path, family):
    # Our own tiny processors, whose tokenizer and pixel caps differ from the real ones on purpose; the real
    # checkpoints' files are trained on in tests/test_real_checkpoints.py.
    model_dir, output_dir = tiny_model(family), tmp_path / family
    args = recipe_args(
        model_dir, demo_data, output_dir,
        "--max_steps", "24", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--warmup_steps", "2",
        "--logging_steps", "4", "--save_strategy", "steps", "--save_steps", "24",
    )  # fmt: skip
    launch_recipe("qwen_vl.py", args)
    losses = logged_losses(output_dir)
    assert losses[24] < 0.7 * losses[4], losses
    config = json.loads((output_dir / "ds_config_resolved.json").read_text())
    assert_resolved_like_arguments(
        config, world_size=NUM_PROCESSES, micro=4, accumulation=1, learning_rate=2e-3
    )
    changed = assert_saved_equals_trained(AutoModelForImageTextToText, output_dir, "checkpoint-24", model_dir)
    assert any(".merger." in name for name in changed)
    assert not any(name.startswith("model.visual.blocks") for name in changed)  # vision tower frozen
    assert any("language_model" in name for name in changed)
    assert_planner_counts_what_the_run_trained("qwen_vl", args)


def experts_picked(model, batch) -> list[set[int]]:
    """For each MoE layer of a Qwen3-VL MoE model, the experts its router picks for the tokens of `batch`."""
    picked, hooks = [], []
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            picked.append(set())
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, out, s=picked[-1]: s.update(out[2].flatten().tolist())
                )
            )
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return picked


@pytest.mark.distributed
def test_qwen3_vl_moe_trains_under_zero3_when_the_ranks_route_to_different_experts(
    tiny_model, demo_data, tmp_path
):
    """Qwen3-VL MoE on 2 processes under the shared ZeRO-3 offload config: on micro-batches of 4 samples the router
    leaves experts idle, a different set on each rank's batch, and the run neither hangs nor breaks (transformers
    holds a layer's experts as one parameter, which ZeRO-3 gathers whole); the loss falls and the saved model equals
    the trained weights, experts included."""
    from vlm_recipes.data import ConversationDataset, load_records

    model_dir, output_dir = tiny_model("qwen3-vl-moe"), tmp_path / "moe"
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    records = load_records(str(demo_data / "train.json"), str(demo_data))
    dataset = ConversationDataset(records, processor, 256)
    collate = ConversationCollator(processor)
    first, second = (
        experts_picked(model, collate([dataset[k] for k in batch])) for batch in ((0, 1, 2, 3), (4, 5, 6, 7))
    )
    experts = model.config.text_config.num_experts
    assert any(len(layer) < experts for layer in first + second), (first, second)  # some experts get no token
    assert first != second  # two ranks' batches route differently

    args = recipe_args(
        model_dir, demo_data, output_dir,
        "--max_steps", "32", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--logging_steps", "4", "--save_strategy", "steps", "--save_steps", "32",
    )  # fmt: skip
    launch_recipe("qwen_vl.py", args, timeout=600)  # a hang would end here
    losses = logged_losses(output_dir)
    assert losses[32] < 0.6 * losses[4], losses
    changed = assert_saved_equals_trained(AutoModelForImageTextToText, output_dir, "checkpoint-32", model_dir)
    assert any(".mlp.experts." in name for name in changed) and any(".mlp.gate." in name for name in changed)
    assert_planner_counts_what_the_run_trained("qwen_vl", args)


@pytest.mark.distributed
def test_dora_adapter_holds_the_merger_and_loads(tiny_model, demo_data, tmp_path):
    """DoRA (--use_dora true; plain LoRA runs in the LLaVA recipe's test): the adapters, their magnitudes and the
    merger are saved, load, and the planner counts what the run trained, magnitudes included."""
    from peft import PeftModel

    from vlm_recipes.inference import load_for_inference

    output_dir = tmp_path / "lora"
    args = recipe_args(
        tiny_model("qwen2.5-vl"), demo_data, output_dir,
        "--use_lora", "true", "--use_dora", "true", "--freeze_language_model", "true", "--lora_r", "8", "--lora_alpha", "16",
        "--lora_vision_target_modules", "qkv", "--max_steps", "6", "--per_device_train_batch_size", "4",
        "--save_strategy", "no",
    )  # fmt: skip
    launch_recipe("qwen_vl.py", args)
    adapter = load_file(output_dir / "adapter_model.safetensors")
    assert any("language_model" in name and "lora_B" in name for name in adapter)
    assert any("visual.blocks" in name and name.endswith("qkv.lora_B.weight") for name in adapter)
    assert any(".merger." in name for name in adapter)
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
    magnitudes = [name for name in adapter if "lora_magnitude_vector" in name]
    assert any("language_model" in name for name in magnitudes) and any(
        "visual" in name for name in magnitudes
    )
    model, _ = load_for_inference(str(output_dir), device="cpu")
    assert isinstance(model, PeftModel) and model.peft_config["default"].use_dora
    # language and vision adapters, their magnitudes, and the merger
    assert_planner_counts_what_the_run_trained("qwen_vl", args)


def mixed_dataset(demo_data, path):
    """With 2 samples per micro-batch and sequential sampling, rank 0 gets only the text-only pairs and
    rank 1 only the image pairs."""
    images = json.loads((demo_data / "train.json").read_text())
    text_only = {
        "conversations": [
            {"from": "human", "value": "Say the word hello."},
            {"from": "gpt", "value": "hello"},
        ]
    }
    records = []
    for k in range(6):
        records += [text_only, text_only, images[2 * k], images[2 * k + 1]]
    path.write_text(json.dumps(records))
    return path


def text_only_rank_args(demo_data, tmp_path) -> list:
    """4 steps in order over mixed_dataset: with 2 processes, rank 0's micro-batches are text-only."""
    return [
        "--dataset_path", mixed_dataset(demo_data, tmp_path / "mixed.json"), "--max_steps", "4",
        "--per_device_train_batch_size", "2", "--train_sampling_strategy", "sequential", "--save_strategy", "no",
        "--logging_steps", "1",
    ]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.gpu_e2e  # and on GPUs over NCCL (make test-gpu with 2+ GPUs)
@requires_processes(2, "rank 0 gets only text-only batches while rank 1 gets images")
def test_rank_with_only_text_batches_does_not_hang(tiny_model, demo_data, tmp_path):
    common = text_only_rank_args(demo_data, tmp_path)
    model_dir = tiny_model("qwen2.5-vl")
    guarded = launch_recipe(
        "qwen_vl.py", recipe_args(model_dir, demo_data, tmp_path / "guarded", *common), timeout=240
    )
    assert guarded.returncode == 0
    assert sorted(logged_losses(tmp_path / "guarded")) == [1, 2, 3, 4]


@pytest.mark.distributed
@pytest.mark.extended  # the control of the test above: one more launch, in `make test-extended`
@requires_processes(2, "rank 0 gets only text-only batches while rank 1 gets images")
def test_without_the_guard_a_rank_with_only_text_batches_breaks_the_run(tiny_model, demo_data, tmp_path):
    common = text_only_rank_args(demo_data, tmp_path)
    model_dir = tiny_model("qwen2.5-vl")
    # Without the guard the same run breaks (gloo drops the connection) or hangs (as on NCCL).
    command = recipe_command(
        "qwen_vl.py",
        recipe_args(
            model_dir, demo_data, tmp_path / "unguarded", *common, "--guard_text_only_batches", "false"
        ),
    )
    log = tmp_path / "unguarded.log"  # the Trainer's progress bar goes to stderr: "3/8 [..."

    def steps_done() -> list[str]:
        return re.findall(r"(\d+)/\d+ \[", log.read_text(errors="replace"))

    with log.open("w") as stderr:
        control = subprocess.Popen(command, cwd=REPO, env={**os.environ, **QUIET_ENV},
                                   stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    try:
        assert control.wait(timeout=120) != 0
    except subprocess.TimeoutExpired:
        # Still running: a hang (the failure the guard prevents) only if no step finishes in another 60 s, so that
        # a run that is merely slow on a busy machine is not counted as one.
        before = steps_done()
        time.sleep(60)
        assert control.poll() is None and steps_done() == before, "the unguarded run is slow, not stuck"
    finally:
        if control.poll() is None:  # hung: stop the launcher and its workers
            for process in [
                *psutil.Process(control.pid).children(recursive=True),
                psutil.Process(control.pid),
            ]:
                process.kill()
            control.wait()
    assert not (tmp_path / "unguarded" / "model.safetensors").exists()
