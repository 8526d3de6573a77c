"""Shared fixtures: a tiny LLaVA and demo data built by the repository's own scripts, and a launcher that
runs a recipe through `accelerate launch` with the real ZeRO-3 offload config, as a user would."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def launch_recipe(recipe: str, args: list, num_processes: int = 2, check: bool = True, timeout: int = 600):
    """`accelerate launch --config_file accelerate_configs/zero3_offload.yaml recipes/<recipe> ARGS`."""
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--config_file", ACCELERATE_CONFIG, "--num_processes", num_processes,
        "--main_process_port", free_port(), REPO / "recipes" / recipe, *args,
    ]  # fmt: skip
    return run_command(command, timeout=timeout, check=check)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-llava"
    run_command([sys.executable, "scripts/make_tiny_model.py", "--family", "llava", "--output_dir", path])
    return path


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
