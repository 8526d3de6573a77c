"""The CheXagent recipe: CheXinstruct-style records against hand-written expectations, 16-bit X-ray PNGs through
the dataset, the prompt format and its labels, and CheXagent's two stages end to end (real `accelerate launch`,
real ZeRO-3 + CPU offload config, 2 processes over gloo): stage 1 assembles the model from a tiny SigLIP and a
tiny Phi checkpoint and trains only the projector, stage 2 starts from stage 1's output, and the final model
reloads with from_pretrained and answers held-out synthetic studies better than the untrained one and than with
the images blanked. The two stages also run on CUDA in bf16 and fp16 (`make test-gpu`, marked gpu_e2e)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tests.conftest import (
    NUM_PROCESSES,
    REPO,
    assert_planner_counts_what_the_run_trained,
    assert_resolved_like_arguments,
    assert_saved_equals_trained,
    launch_recipe,
    logged_losses,
    pickle_that_touches,
    run_here,
    run_script_here,
)
from vlm_recipes.data import ConversationDataset, DataError, load_records
from vlm_recipes.masking import IGNORE_INDEX, tokenize_conversation

YES_NO = "Is there an opacity in the lung?"
PROJECTOR = {f"model.multi_modal_projector.linear_{k}.{p}" for k in (1, 2) for p in ("weight", "bias")}


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name in ("pa.png", "lateral.png"):
        Image.new("L", (8, 8), 90).save(root / name)
    return root


@pytest.fixture(scope="module")
def xray_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("xray")
    run_script_here(
        "make_xray_demo_data.py", ["--output_dir", path, "--num_train", "240", "--num_test", "40"]
    )
    return path


# ---- CheXinstruct-style records ----------------------------------------------------------------------------


def test_chexinstruct_records_normalize_to_typed_messages(tmp_path, image_root):
    records = [
        {"id": "one-view", "image_path": "pa.png", "qa_pair": {"q": YES_NO, "a": "yes"}},
        {"id": "two-views", "image_path": ["pa.png", "lateral.png"], "qa_pair": {"q": YES_NO, "a": "no"}},
        {"id": "two-turns", "image_path": "pa.png",
         "qa_pair": [{"q": YES_NO, "a": "yes"}, {"q": "Which lung?", "a": "left"}]},
        {"id": "text", "image_path": ["pa.png"], "text": "Describe the finding.", "target_text": "The lungs are clear."},
        # CheXinstruct's closed-ended questions: the answer is in qa_pair, target_text is empty.
        {"id": "both", "image_path": "pa.png", "text": YES_NO, "target_text": "", "qa_pair": {"q": YES_NO, "a": "no"}},
        {"id": "text-only", "image_path": "", "text": "Summarize: no acute findings.", "target_text": "Normal."},
    ]  # fmt: skip
    loaded = load_records(str(write_jsonl(tmp_path / "cxr.jsonl", records)), str(image_root))

    pa, lateral = (image_root / "pa.png").resolve(), (image_root / "lateral.png").resolve()
    expected = {
        "one-view": ([user(YES_NO, images=1), assistant("yes")], [pa]),
        "two-views": ([user(YES_NO, images=2), assistant("no")], [pa, lateral]),
        "two-turns": ([user(YES_NO, 1), assistant("yes"), user("Which lung?"), assistant("left")], [pa]),
        "text": ([user("Describe the finding.", images=1), assistant("The lungs are clear.")], [pa]),
        "both": ([user(YES_NO, images=1), assistant("no")], [pa]),
        "text-only": ([user("Summarize: no acute findings."), assistant("Normal.")], []),
    }
    assert [record["id"] for record in loaded] == list(expected)
    for record in loaded:
        assert (record["messages"], record["images"]) == expected[record["id"]], record["id"]


def test_bad_chexinstruct_records_are_reported_with_file_and_record(tmp_path, image_root):
    records = [
        {"id": "ok", "image_path": "pa.png", "qa_pair": {"q": YES_NO, "a": "no"}},
        {"id": "no-answer", "image_path": "pa.png", "qa_pair": {"q": YES_NO}},
        {"id": "bad-turn", "image_path": "pa.png", "qa_pair": [{"q": YES_NO, "a": "yes"}, "Which lung?"]},
        {"id": "no-target", "image_path": "pa.png", "text": "Describe the finding."},
        {"id": "empty-list", "image_path": "pa.png", "qa_pair": []},
        {"id": "missing-view", "image_path": ["pa.png", "ap.png"], "qa_pair": {"q": YES_NO, "a": "no"}},
    ]
    path = write_jsonl(tmp_path / "cxr.jsonl", records)
    with pytest.raises(DataError) as error:
        load_records(str(path), str(image_root))
    message = str(error.value)
    assert message.startswith(f"5 problem(s) in {path}:")
    assert (
        f'{path}, record at line 2 (id no-answer): qa_pair must be {{"q": question, "a": answer}}' in message
    )
    assert "record at line 3 (id bad-turn): qa_pair[1] must be" in message
    assert 'record at line 4 (id no-target): a CheXinstruct record needs "qa_pair", or "text"' in message
    assert 'record at line 5 (id empty-list): "qa_pair" is an empty list' in message
    assert (
        f"record at line 6 (id missing-view): image {(image_root / 'ap.png').resolve()} does not exist"
        in message
    )
    assert "line 1 " not in message


@pytest.mark.parametrize("name", ["data_chexinstruct.pkl", "data_chexinstruct.json"])
def test_pickle_is_refused_with_the_reason_and_the_fix(tmp_path, name):
    # The CheXinstruct compile script writes a pickle named .json: refused by its first bytes, not its name.
    path, ran = tmp_path / name, tmp_path / "the pickle ran"
    path.write_bytes(pickle_that_touches(ran))
    with pytest.raises(
        DataError,
        match="pickle files are refused, since loading one runs arbitrary code; save the records as JSONL",
    ):
        load_records(str(path))
    assert not ran.exists()  # refused before loading, not after


# ---- prompt format, labels, 16-bit X-rays ----------------------------------------------------------------


def test_prompt_format_and_labels(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model("chexagent"))
    messages = [user(YES_NO, images=2), assistant("yes"), user("Which lung?"), assistant("left")]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        "USER: Picture 1: <image>\nPicture 2: <image>\nIs there an opacity in the lung?\n"
        "ASSISTANT: yes<|endoftext|>\nUSER: Which lung?\nASSISTANT: left<|endoftext|>\n"
    )
    assert processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True).endswith(
        "lung?\nASSISTANT:"
    )
    sample = tokenize_conversation(processor, messages, [Image.new("RGB", (64, 64))] * 2)
    assert int((sample["input_ids"] == processor.image_token_id).sum()) == 2 * 16  # (32 / 8) ** 2 per view
    # Only the answers and the end-of-text token after each carry labels.
    labels = sample["labels"][sample["labels"] != IGNORE_INDEX]
    assert processor.tokenizer.decode(labels) == " yes<|endoftext|> left<|endoftext|>"


def test_16_bit_grayscale_xray_png_goes_through_the_dataset(tmp_path, tiny_model):
    pixels = np.linspace(1000, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)  # 12-bit values, 16-bit PNG
    Image.fromarray(pixels).save(tmp_path / "xray.png")
    with Image.open(tmp_path / "xray.png") as png:
        assert png.mode == "I;16"
    record = {"id": "x", "image_path": "xray.png", "qa_pair": {"q": YES_NO, "a": "no"}}
    records = load_records(str(write_jsonl(tmp_path / "x.jsonl", [record])), str(tmp_path))
    processor = AutoProcessor.from_pretrained(tiny_model("chexagent"))

    sample = ConversationDataset(records, processor, max_length=128)[0]
    image = sample["pixel_values"][0]
    assert tuple(image.shape) == (3, 32, 32)
    # Stretched to the full range (SigLIP scales 0..255 to -1..1), not clipped white by an 8-bit conversion,
    # and grey: the three channels are the same.
    assert image.min() < -0.95 and image.max() > 0.95
    assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
    assert (
        processor.tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX]) == " no<|endoftext|>"
    )


# ---- the recipe's own checks --------------------------------------------------------------------------------


def test_model_sources_are_checked_before_any_weights(tiny_model, xray_data, tmp_path, monkeypatch):
    """The recipe itself, run in this process on each wrong combination of model sources: it stops with the fix
    before any model is built or any weights are read."""
    from transformers import PreTrainedModel

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was loaded before the model sources were checked")

    parts = tiny_model("chexagent")  # built before the spy is in place
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_weights))
    monkeypatch.setattr(PreTrainedModel, "_from_config", classmethod(no_weights))
    monkeypatch.chdir(REPO)
    vision, text = ["--vision_model_name_or_path", parts / "vision_encoder"], ["--text_model_name_or_path", parts / "language_model"]  # fmt: skip
    base = [
        "--config", "recipes/configs/chexagent_stage1_demo.yaml", "--dataset_path", xray_data / "train.jsonl",
        "--image_root", xray_data, "--output_dir", tmp_path / "out", "--deepspeed", "none",
    ]  # fmt: skip
    cases = {
        "either --model_name_or_path .* not both": ["--model_name_or_path", parts, *vision, *text],
        "needs both --vision_model_name_or_path and --text_model_name_or_path": [*vision, "--text_model_name_or_path", ""],
        "run stage 1 .* first, then LoRA": [*vision, *text, "--use_lora", "true"],
        "got 'siglip' .* and 'llava'": [*vision, "--text_model_name_or_path", parts],  # a whole LLaVA as the LM
    }  # fmt: skip
    for message, args in cases.items():
        outcome = run_here("recipes/chexagent.py", [*base, *args], monkeypatch)
        assert outcome.startswith("ConfigError") and re.search(message, outcome), (message, outcome)
    assert not (tmp_path / "out").exists()


# ---- stage 1, then stage 2 from its output, both under 2-process ZeRO-3 offload -------------------------------


def recipe_args(config, data, output_dir, *extra):
    return [
        "--config", f"recipes/configs/{config}",
        "--dataset_path", data / "train.jsonl", "--image_root", data,
        "--output_dir", output_dir, "--overwrite_output_dir", "false",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stage1(tiny_model, xray_data, tmp_path_factory):
    """Assembled from the tiny SigLIP and Phi checkpoints, as chexagent_stage1.yaml does with the real ones."""
    parts, output_dir = tiny_model("chexagent"), tmp_path_factory.mktemp("chexagent") / "stage1"
    args = recipe_args(
        "chexagent_stage1_demo.yaml", xray_data, output_dir,
        "--vision_model_name_or_path", parts / "vision_encoder", "--text_model_name_or_path", parts / "language_model",
        "--max_steps", "6", "--warmup_steps", "1", "--logging_steps", "3", "--save_strategy", "steps", "--save_steps", "6",
    )  # fmt: skip
    return output_dir, launch_recipe("chexagent.py", args), args


@pytest.fixture(scope="module")
def stage2(stage1, xray_data):
    stage1_dir, _, _ = stage1
    output_dir = stage1_dir.parent / "stage2"
    args = recipe_args(
        "chexagent_stage2_demo.yaml", xray_data, output_dir, "--model_name_or_path", stage1_dir,
        "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--max_steps", "80",
        "--warmup_steps", "5", "--logging_steps", "10", "--save_strategy", "steps", "--save_steps", "80",
        # 5e-3, not recipe_args' 2e-3: both read the images in 80 steps, 5e-3 by a wider margin over blank ones
        # (single-process runs, 4 data x 2 training seeds: +0.28 to +0.35 against +0.20 to +0.28).
        "--learning_rate", "5e-3",
    )  # fmt: skip
    launch_recipe("chexagent.py", args)
    return output_dir, args


@pytest.mark.distributed
@pytest.mark.gpu_e2e
def test_stage1_assembles_the_parts_and_trains_only_the_projector(stage1, tiny_model):
    output_dir, result, args = stage1
    config = json.loads((output_dir / "ds_config_resolved.json").read_text())
    assert_resolved_like_arguments(
        config, world_size=NUM_PROCESSES, micro=4, accumulation=2, learning_rate=2e-3
    )
    # The tiny model is what assembling its parts must give, up to the fresh projector: so the vision encoder
    # and the language model (with the image token's rows) were loaded whole into the ZeRO-3-partitioned model.
    changed = assert_saved_equals_trained(
        LlavaForConditionalGeneration, output_dir, "checkpoint-6", tiny_model("chexagent")
    )
    assert changed == PROJECTOR
    saved, reference = (
        AutoProcessor.from_pretrained(output_dir),
        AutoProcessor.from_pretrained(tiny_model("chexagent")),
    )
    assert saved.chat_template == reference.chat_template
    assert saved.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
    assert (saved.image_token_id, saved.patch_size, saved.vision_feature_select_strategy) == (512, 8, "full")
    assert "dropping the language model's output bias" in result.stdout + result.stderr
    # the planner sees the assembled model as the recipe's host-RAM check does: its saved config
    assert_planner_counts_what_the_run_trained("chexagent", args, model_config_dir=output_dir)


@pytest.mark.distributed
@pytest.mark.gpu_e2e
def test_stage2_from_stage1_trains_projector_and_language_model(stage1, stage2):
    stage1_dir, _, _ = stage1
    stage2_dir, args = stage2
    losses = logged_losses(stage2_dir)
    assert losses[80] < 0.5 * losses[10], losses
    changed = assert_saved_equals_trained(
        LlavaForConditionalGeneration, stage2_dir, "checkpoint-80", stage1_dir
    )
    assert PROJECTOR <= changed
    assert any(name.startswith("model.language_model.") for name in changed) and "lm_head.weight" in changed
    assert not any("vision_tower" in name for name in changed)
    assert_planner_counts_what_the_run_trained("chexagent", args)


def blank_copy(data_dir: Path, to: Path) -> Path:
    """The same records with every image replaced by a flat one of its size, mode and mean: nothing to read."""
    shutil.copytree(data_dir, to)
    for path in to.rglob("*.png"):
        with Image.open(path) as image:
            mean = float(np.asarray(image, dtype=np.float64).mean())
            blank = Image.new(image.mode, image.size, int(round(mean)))
        blank.save(path)
    return to


@pytest.fixture(scope="module")
def held_out_accuracy(stage2, tiny_model, xray_data, tmp_path_factory):
    """Exact-match accuracy on the held-out studies: untrained, after stage 1 + stage 2, and the same fine-tuned
    model on the same questions with every image blank (what it gets without reading the images)."""
    folder = tmp_path_factory.mktemp("evaluate")

    def accuracy(model_dir, data_dir, name):
        # scripts/evaluate.py, run in this process; its per-record predictions file is scored here
        predictions = folder / f"{name}.jsonl"
        run_script_here("evaluate.py", [
            "--model_name_or_path", model_dir, "--dataset_path", data_dir / "test.jsonl", "--image_root", data_dir,
            "--predictions_file", predictions,
        ])  # fmt: skip
        scored = [json.loads(line)["correct"] for line in predictions.read_text().splitlines()]
        assert len(scored) == 40  # every held-out study
        return sum(scored) / len(scored)

    scores = {
        "untrained": accuracy(tiny_model("chexagent"), xray_data, "before"),
        "trained": accuracy(stage2[0], xray_data, "after"),
        "blank images": accuracy(stage2[0], blank_copy(xray_data, folder / "blank"), "blank"),
    }
    print(f"held-out accuracy: {scores}")
    return scores


@pytest.mark.distributed
@pytest.mark.gpu_e2e
def test_final_model_answers_held_out_studies_better_than_the_untrained_one(held_out_accuracy):
    assert (
        held_out_accuracy["trained"] > held_out_accuracy["untrained"] and held_out_accuracy["trained"] >= 0.3
    )


@pytest.mark.distributed
def test_final_model_reads_the_images(held_out_accuracy):
    # a blind model tops out near 0.5 on these questions (scripts/make_xray_demo_data.py)
    assert held_out_accuracy["trained"] >= held_out_accuracy["blank images"] + 0.15, held_out_accuracy


@pytest.mark.distributed
@pytest.mark.extended  # LoRA as LLaVA's and Qwen's recipes run it in `make test`; this one in `make test-extended`
def test_lora_from_stage1_saves_an_adapter_with_the_projector(stage1, xray_data):
    from peft import PeftModel

    from vlm_recipes.inference import load_for_inference

    stage1_dir, _, _ = stage1
    output_dir = stage1_dir.parent / "lora"
    args = recipe_args(
        "chexagent_lora.yaml", xray_data, output_dir, "--model_name_or_path", stage1_dir,
        "--max_steps", "4", "--lora_r", "8", "--lora_alpha", "16", "--max_length", "128", "--save_strategy", "no",
        "--report_to", "none", "--dataloader_num_workers", "0", "--logging_steps", "2",
    )  # fmt: skip
    launch_recipe("chexagent.py", args)
    assert not (output_dir / "model.safetensors").exists()
    adapter = load_file(output_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # lora_B starts at zero: it trained
    assert {"dense", "fc1", "fc2"} <= {
        re.sub(r".*\.(\w+)\.lora_B.*", r"\1", n) for n in adapter if "lora_B" in n
    }
    assert any("multi_modal_projector" in name for name in adapter)
    assert not any("vision_tower" in name for name in adapter)
    model, _ = load_for_inference(str(output_dir), device="cpu")
    assert isinstance(model, PeftModel)
