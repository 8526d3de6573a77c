"""Shared fixtures: a tiny LLaVA and demo data built by the repository's own scripts, and a launcher that
runs a recipe through `accelerate launch` with the real ZeRO-3 offload config, as a user would."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIG = REPO / "accelerate_configs" / "zero3_offload.yaml"
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "warning", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_command(command: list, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **QUIET_ENV}
    result = subprocess.run(
        [str(part) for part in command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(map(str, command))}\n"
            f"--- stdout (end) ---\n{result.stdout[-6000:]}\n--- stderr (end) ---\n{result.stderr[-10000:]}"
        )
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe_command(
    recipe: str, args: list, num_processes: int = 2, accelerate_config=ACCELERATE_CONFIG
) -> list[str]:
    """`accelerate launch --config_file accelerate_configs/zero3_offload.yaml recipes/<recipe> ARGS`, or with
    another accelerate config."""
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--config_file", accelerate_config, "--num_processes", num_processes,
        "--main_process_port", free_port(), REPO / "recipes" / recipe, *args,
    ]  # fmt: skip
    return [str(part) for part in command]


def launch_recipe(recipe: str, args: list, num_processes: int = 2, check: bool = True, timeout: int = 600,
                  accelerate_config=ACCELERATE_CONFIG):  # fmt: skip
    command = recipe_command(recipe, args, num_processes, accelerate_config)
    return run_command(command, timeout=timeout, check=check)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("qwen2.5-vl") -> the folder of that family's tiny model, built once per session."""
    built = {}

    def build(family: str) -> Path:
        if family not in built:
            path = tmp_path_factory.mktemp("models") / f"tiny-{family}"
            run_command(
                [sys.executable, "scripts/make_tiny_model.py", "--family", family, "--output_dir", path]
            )
            built[family] = path
        return built[family]

    return build


@pytest.fixture(scope="session")
def tiny_llava(tiny_model) -> Path:
    return tiny_model("llava")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    run_command(
        [
            sys.executable,
            "scripts/make_demo_data.py",
            "--output_dir",
            path,
            "--num_train",
            "96",
            "--num_test",
            "16",
        ]
    )
    return path


# ---- what the end-to-end tests check --------------------------------------------------------------------------

TINY_HIDDEN_SIZE = 64  # the tiny models' text hidden size, which fills the bucket-size "auto"s


def logged_losses(output_dir) -> dict[int, float]:
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def assert_resolved_like_arguments(config, *, world_size, micro, accumulation, learning_rate):
    """Every "auto" of ds_configs/zero3_offload.json, replaced by what the TrainingArguments imply."""
    assert "auto" not in json.dumps(config)
    assert config["train_micro_batch_size_per_gpu"] == micro
    assert config["gradient_accumulation_steps"] == accumulation
    assert config["train_batch_size"] == world_size * micro * accumulation
    assert config["gradient_clipping"] == 1.0
    assert config["optimizer"]["params"] == {
        "lr": learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0
    }  # fmt: skip
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False  # fp32 on CPU
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == TINY_HIDDEN_SIZE * TINY_HIDDEN_SIZE
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * TINY_HIDDEN_SIZE * TINY_HIDDEN_SIZE)
    assert zero["stage3_param_persistence_threshold"] == 10 * TINY_HIDDEN_SIZE
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert "scheduler" not in config  # the Trainer's --lr_scheduler_type is what runs


def assert_saved_equals_trained(model_class, output_dir, checkpoint: str, initial_dir) -> set[str]:
    """The model saved in output_dir reloads with from_pretrained and equals, tensor for tensor, the fp32
    weights DeepSpeed trained (consolidated from the ZeRO shards of `checkpoint`). Returns the names of the
    tensors that differ from the initial model's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    output_dir = Path(output_dir)
    assert (output_dir / "model.safetensors").stat().st_size > 500_000  # full weights, not a ZeRO stub
    reloaded = model_class.from_pretrained(output_dir).state_dict()
    trained = get_fp32_state_dict_from_zero_checkpoint(str(output_dir / checkpoint))
    assert trained and set(trained) <= set(reloaded)
    for name, tensor in trained.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)
    initial = model_class.from_pretrained(initial_dir).state_dict()
    return {name for name in initial if not torch.equal(initial[name], reloaded[name])}
