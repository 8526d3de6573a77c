"""What users do in the hour after a fine-tune, run the way they run it: ask the model a question
(scripts/infer.py), merge a LoRA adapter (scripts/merge_lora.py), convert a ZeRO-3 checkpoint of a real
2-process run (scripts/zero_to_hf.py), plot the training curves (scripts/plot_training.py)."""

import importlib.util
import json
import math
import runpy
import shutil
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaModel

from tests.conftest import REPO, assert_equal_in_training_precision
from vlm_recipes.inference import load_for_inference, user_turn
from vlm_recipes.masking import add_special_tokens_for, render

SCRIPTS = ("infer.py", "merge_lora.py", "zero_to_hf.py", "plot_training.py")


def load_script(name: str):
    """A script of scripts/ as a module, to call its functions directly (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_inputs(processor, image_path) -> dict:
    text = render(processor, user_turn("What color is the shape? Answer with one word.", 1), True)
    return processor(
        text=[text],
        images=[Image.open(image_path).convert("RGB")],
        add_special_tokens=add_special_tokens_for(processor, text),
        return_tensors="pt",
    )


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_the_script(script, monkeypatch, capsys):
    # `python scripts/<script> --help`, run in this process: the same code, without the ~8 s of importing torch and
    # transformers again on CI's machine.
    monkeypatch.setattr(sys, "argv", [f"scripts/{script}", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    assert exited.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"python scripts/{script}" in out  # the docstring's example command
    assert "usage:" in out and "options:" in out


# ---- inference --------------------------------------------------------------------------------------------------


def test_infer_answers_from_the_image_it_is_given(tiny_llava, demo_data, run_in_process, monkeypatch):
    """The pixels of --image reach the vision tower, and the printed answer is the model's greedy answer to the
    question about that image. (Whether a fine-tuned model reads images is a property of the model: the tiny demo
    models learn the answers' prior first, see tests/test_chexagent_recipe.py::test_final_model_reads_the_images.)"""
    image = demo_data / "images" / "test_0001.png"
    question = "What color is the shape? Answer with one word."
    seen = []
    original = LlavaModel.get_image_features  # what the model's forward calls with the pixels

    def spy(self, pixel_values, *args, **kwargs):
        seen.append(pixel_values.detach().clone())
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(LlavaModel, "get_image_features", spy)
    outcome, out, _ = run_in_process(
        "scripts/infer.py", "--model_name_or_path", tiny_llava, "--image", image, "--prompt", question,
        "--max_new_tokens", "4",
    )  # fmt: skip
    assert outcome == "finished"
    printed = out.strip().splitlines()[-1]
    processor = AutoProcessor.from_pretrained(tiny_llava)
    inputs = model_inputs(processor, image)
    assert seen and all(
        torch.equal(pixels, inputs["pixel_values"]) for pixels in seen
    )  # this image, no other
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert printed == f"answer: {expected}".strip(), (printed, expected)


def test_infer_names_a_missing_image_and_a_folder_without_a_model(tiny_llava, tmp_path, run_in_process):
    missing = tmp_path / "missing.png"
    outcome, _, err = run_in_process(
        "scripts/infer.py", "--model_name_or_path", tiny_llava, "--image", missing, "--prompt", "?"
    )
    said = outcome + err
    assert outcome.startswith("SystemExit") and str(missing) in said and "--image" in said
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a model.*checkpoint-5"):
        load_for_inference(str(tmp_path), device="cpu")


# ---- LoRA merge -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["lora", "dora"])
def lora_adapter(request, tiny_llava, tmp_path_factory):
    """A LoRA (or DoRA) adapter on the tiny model, as recipes/llava.py configures it (training.lora_config:
    language-model linear layers, projector in modules_to_save), with lora_B, DoRA's magnitudes and the projector
    randomised so that merging changes the model a lot: a zero lora_B, as PEFT initialises it, would make any
    merge look right."""
    from peft import get_peft_model

    from vlm_recipes.config import ModelArguments
    from vlm_recipes.training import lora_config

    torch.manual_seed(0)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    model_args = ModelArguments(
        str(tiny_llava), use_lora=True, use_dora=request.param == "dora", lora_r=8, lora_alpha=16
    )
    config = lora_config(
        model_args, {"model.language_model": model_args.lora_target_modules}, ["multi_modal_projector"]
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("lora_B", "modules_to_save", "lora_magnitude_vector")):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path_factory.mktemp(request.param) / "adapter"
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(tiny_llava).save_pretrained(path)  # as the Trainer saves the processor
    return path


def test_merged_lora_reloads_and_matches_base_plus_adapter(
    lora_adapter, tiny_llava, demo_data, tmp_path, run_in_process
):
    merged_dir = tmp_path / "merged"
    outcome, out, _ = run_in_process(
        "scripts/merge_lora.py", "--adapter", lora_adapter, "--output_dir", merged_dir
    )
    assert outcome == "finished" and "merge check: max |logit difference|" in out
    assert not (merged_dir / "adapter_config.json").exists()
    merged, info = LlavaForConditionalGeneration.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert (
        processor.tokenizer.padding_side == AutoProcessor.from_pretrained(tiny_llava).tokenizer.padding_side
    )

    inputs = model_inputs(processor, sorted((demo_data / "images").glob("test_*.png"))[0])
    with_adapter, _ = load_for_inference(str(lora_adapter), device="cpu")
    expected = logits_of(with_adapter, inputs)
    actual = logits_of(merged, inputs)
    base = logits_of(LlavaForConditionalGeneration.from_pretrained(tiny_llava), inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert (base - expected).abs().max() > 0.1  # the adapter matters, so the match above means something


def test_merge_lora_refuses_a_folder_without_adapter(tiny_llava, tmp_path, run_in_process):
    outcome, _, err = run_in_process(
        "scripts/merge_lora.py", "--adapter", tiny_llava, "--output_dir", tmp_path / "out"
    )
    said = outcome + err
    assert outcome.startswith("SystemExit")
    assert f"{tiny_llava} has no adapter_config.json" in said and "nothing to merge" in said


# ---- ZeRO checkpoint conversion (one real 2-process ZeRO-3 run) ----------------------------------------------------


@pytest.fixture(scope="module")
def zero3_run(llava_zero3_run):
    """The output_dir of the tiny LLaVA's shared ZeRO-3 offload run (tests/conftest.py): checkpoints 15 and 30."""
    return llava_zero3_run[0]


@pytest.mark.distributed
def test_zero_to_hf_converts_a_shard_only_checkpoint(zero3_run, tmp_path, run_in_process):
    checkpoint = zero3_run / "checkpoint-30"
    # As a checkpoint written with 16-bit gathering off: DeepSpeed's shards, config and processor, no weights.
    shards_only = tmp_path / "checkpoint-30"
    shutil.copytree(checkpoint, shards_only, ignore=shutil.ignore_patterns("model.safetensors"))
    with pytest.raises(FileNotFoundError, match="ZeRO shards only: python scripts/zero_to_hf.py"):
        load_for_inference(str(shards_only), device="cpu")

    converted = tmp_path / "converted"
    outcome, out, _ = run_in_process("scripts/zero_to_hf.py", shards_only, converted)
    assert outcome == "finished" and json.loads(out.strip().splitlines()[-1])["kind"] == "model"
    reloaded, info = LlavaForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # fp32 training: the 16-bit-gathered save and DeepSpeed's fp32 master weights are the same numbers (in a
    # bf16/fp16 run on a GPU, the same once rounded to 16 bits).
    gathered = LlavaForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    converted_weights = reloaded.state_dict()
    assert set(converted_weights) == set(gathered)
    for name, tensor in gathered.items():
        assert_equal_in_training_precision(converted_weights[name], tensor, name)
    for name in ("generation_config.json", "processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (converted / name).is_file(), name
    AutoProcessor.from_pretrained(converted)


@pytest.mark.distributed
def test_zero_to_hf_explains_a_folder_without_shards(zero3_run):
    zero_to_hf = load_script("zero_to_hf")
    with pytest.raises(
        zero_to_hf.ConversionError,
        match="no global_step.*pass one of its checkpoints \\(checkpoint-15, checkpoint-30\\)",
    ):
        zero_to_hf.find_tag(zero3_run, None)  # the output_dir, whose final save was gathered
    with pytest.raises(zero_to_hf.ConversionError, match="global_step99 does not exist.*global_step30"):
        zero_to_hf.find_tag(zero3_run / "checkpoint-30", "global_step99")


@pytest.mark.distributed
def test_plot_of_a_real_run_has_throughput(zero3_run, tmp_path, monkeypatch):
    """Each of the four panels of a real run's plot draws that run's own logged series (loss, learning rate,
    gradient norm, tokens/s), read back from the figure itself."""
    plot_training = load_script("plot_training")
    drawn = []
    monkeypatch.setattr(plot_training.plt, "close", drawn.append)  # keep the figure to read it back
    state_file = zero3_run / "trainer_state.json"
    png = tmp_path / "training_curves.png"
    plot_training.plot(json.loads(state_file.read_text()), state_file, png)
    with Image.open(png) as image:
        assert image.size == (1440, 960)
    (figure,) = drawn
    panels = {axis.get_title(loc="left"): axis for axis in figure.axes}
    history = json.loads(state_file.read_text())["log_history"]
    for title, key in [("Loss", "loss"), ("Learning rate", "learning_rate"),
                       ("Gradient norm (before clipping)", "grad_norm"), ("Throughput", "train_tokens_per_second")]:  # fmt: skip
        logged = [(entry["step"], entry[key]) for entry in history if key in entry]
        assert len(logged) >= 5, (key, logged)  # logged every 5 of 30 steps
        (line,) = [line for line in panels[title].get_lines() if len(line.get_xdata())]
        steps, values = zip(*logged, strict=True)
        assert list(line.get_xdata()) == list(steps), title
        assert list(line.get_ydata()) == pytest.approx(values), title


# ---- training plots ---------------------------------------------------------------------------------------------


def realistic_state(steps: int = 300, logging_steps: int = 10, eval_steps: int = 50) -> dict:
    """A trainer_state.json as the Trainer writes it: step logs, eval logs and the final summary."""
    history = []
    for step in range(logging_steps, steps + 1, logging_steps):
        warmup = min(1.0, step / 30)
        history.append({
            "epoch": step / 100, "step": step, "loss": 0.08 + 5 * math.exp(-step / 40),
            "learning_rate": 2e-5 * warmup * 0.5 * (1 + math.cos(math.pi * step / steps)),
            "grad_norm": 0.3 + 4 * math.exp(-step / 60) + 0.2 * math.sin(step),
            "num_input_tokens_seen": step * 4096, "train_tokens_per_second": 5200 - 900 * math.exp(-step / 20),
        })  # fmt: skip
        if step % eval_steps == 0:
            history.append({"epoch": step / 100, "step": step, "eval_loss": 0.15 + 4 * math.exp(-step / 45)})
    history.append(
        {
            "epoch": 3.0,
            "step": steps,
            "train_loss": 0.9,
            "train_runtime": 812.5,
            "train_samples_per_second": 11.8,
        }
    )
    return {"global_step": steps, "epoch": 3.0, "log_history": history}


def test_plot_training_writes_a_png_next_to_the_state(tmp_path, run_in_process):
    (tmp_path / "trainer_state.json").write_text(json.dumps(realistic_state()))
    outcome, out, _ = run_in_process("scripts/plot_training.py", tmp_path)
    png = tmp_path / "training_curves.png"
    assert outcome == "finished" and out.strip() == str(png)
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1440, 960)
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or []) > 20  # lines and text, not blank


def test_plot_training_names_a_folder_without_state(tmp_path, run_in_process):
    outcome, _, err = run_in_process("scripts/plot_training.py", tmp_path)
    assert outcome.startswith("SystemExit") and f"no trainer_state.json in {tmp_path}" in outcome + err
