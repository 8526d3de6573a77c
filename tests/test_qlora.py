"""QLoRA (--load_in_4bit true): what it needs is refused in one error before anything loads, on any machine; the
4-bit run itself needs a CUDA GPU and bitsandbytes, so it runs in `make test-gpu` (marked gpu_e2e, skipped here)."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, launch_recipe, llava_recipe_args
from vlm_recipes.config import ConfigError, ModelArguments
from vlm_recipes.training import check_quantization

HAS_QLORA = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


class Arguments:  # what check_quantization reads of TrainingArguments
    def __init__(self, deepspeed=None, use_cpu=False):
        self.deepspeed, self.use_cpu = deepspeed, use_cpu


def test_every_missing_piece_of_qlora_is_named_in_one_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    offload = str(REPO / "ds_configs" / "zero3_offload.json")
    with pytest.raises(ConfigError) as refused:
        check_quantization(ModelArguments("m", load_in_4bit=True), Arguments(offload))
    message = str(refused.value)
    assert message.startswith("--load_in_4bit true (QLoRA) cannot run as configured:")
    for problem in (
        "pass --use_lora true",
        "need a CUDA GPU",
        "pip install bitsandbytes",
        "QLoRA runs without DeepSpeed in these recipes (" + offload,
    ):
        assert problem in message
    assert "accelerate_configs/single_gpu.yaml" in message and "--deepspeed none" in message  # the fix
    # Without DeepSpeed on a GPU it runs; under ZeRO-3 or ZeRO-2 (measured failing) it does not; without
    # --load_in_4bit nothing is checked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    qlora = ModelArguments("m", load_in_4bit=True, use_lora=True)
    check_quantization(qlora, Arguments(None))
    for ds_config in ("zero3.json", "zero2_offload.json"):
        with pytest.raises(ConfigError, match=f"{ds_config} is in use"):
            check_quantization(qlora, Arguments(str(REPO / "ds_configs" / ds_config)))
    check_quantization(ModelArguments("m"), Arguments(offload, use_cpu=True))


def test_qlora_keeps_each_recipes_vision_tower_projector_and_head_in_16_bits(tiny_model):
    """transformers' own rule for llm_int8_skip_modules (a pattern matches a module name from its start, or its end)
    applied to each recipe's ModelParts.kept_in_16_bit: every Linear of the vision tower, the projector and the output
    head is kept, every Linear of the language model's decoder is quantized. Bare names ("multi_modal_projector")
    matched nothing and left the projector in 4 bits on the GPU."""
    from transformers import AutoModelForImageTextToText
    from transformers.quantizers.quantizers_utils import should_convert_module

    from vlm_recipes.config import load_recipe

    for recipe, family in [("llava", "llava"), ("llava", "llava-next"), ("qwen_vl", "qwen2.5-vl")]:
        parts = load_recipe(REPO / "recipes" / f"{recipe}.py").PARTS
        model = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
        kept = parts.kept_in_16_bit()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                quantized = should_convert_module(name, kept)
                assert quantized == (parts.role_of(name) == "language" and name != parts.output_head), (
                    family,
                    name,
                )


@pytest.mark.distributed
def test_the_plain_launch_with_qlora_stops_before_loading_weights(tiny_llava, demo_data, tmp_path):
    args = llava_recipe_args(
        tiny_llava, demo_data, tmp_path / "out", "--load_in_4bit", "true", "--use_lora", "true"
    )
    result = launch_recipe("llava.py", args, num_processes=1, check=False)
    assert result.returncode != 0 and "--load_in_4bit true (QLoRA) cannot run as configured" in result.stderr
    assert "QLoRA runs without DeepSpeed" in result.stderr and "Loading weights" not in result.stderr


@pytest.mark.gpu_e2e
@pytest.mark.distributed
@pytest.mark.skipif(not HAS_QLORA, reason="QLoRA needs a CUDA GPU and bitsandbytes: `make test-gpu`")
def test_qlora_trains_adapters_on_4_bit_weights_and_merges(tiny_llava, demo_data, tmp_path, run_in_process):
    """The tiny LLaVA with a 4-bit language model, on one GPU without DeepSpeed (accelerate_configs/single_gpu.yaml):
    the adapters train, the adapter is saved with the 16-bit projector, and merge_lora.py folds it into the
    16-bit base."""
    output_dir = tmp_path / "qlora"
    args = llava_recipe_args(tiny_llava, demo_data, output_dir)
    args[1] = "recipes/configs/llava_lora.yaml"
    args += [
        "--load_in_4bit", "true", "--max_steps", "10", "--per_device_train_batch_size", "4",
        "--learning_rate", "2e-3", "--lora_r", "8", "--lora_alpha", "16", "--max_length", "128",
        "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0", "--logging_steps", "5",
    ]  # fmt: skip
    accelerate_config = REPO / "accelerate_configs" / "single_gpu.yaml"
    args += [
        "--deepspeed",
        "none",
    ]  # the YAML's zero3_offload.json would apply under a launcher without DeepSpeed
    result = launch_recipe("llava.py", args, num_processes=1, accelerate_config=accelerate_config)
    said = result.stdout + result.stderr
    assert "linear layers hold 4-bit weights (QLoRA)" in said
    adapter = load_file(output_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # lora_B starts at zero: it trained
    projector = {
        name: t.shape for name, t in adapter.items() if "multi_modal_projector" in name and "weight" in name
    }
    assert projector and all(len(shape) == 2 and shape[1] > 1 for shape in projector.values()), (
        projector
    )  # 16-bit
    losses = [entry["loss"] for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]  # fmt: skip
    assert losses and losses[-1] < losses[0]
    outcome, out, _ = run_in_process(
        "scripts/merge_lora.py", "--adapter", output_dir, "--output_dir", tmp_path / "merged"
    )
    assert outcome == "finished" and "merge check: max |logit difference|" in out
