"""Shared fixtures: a tiny LLaVA and demo data built by the repository's own scripts, and a launcher that
runs a recipe through `accelerate launch` with the real ZeRO-3 offload config, as a user would.

Where the end-to-end tests run is set by two environment variables; unset, they run as CI runs them:
    VLM_TEST_NUM_PROCESSES   processes per launch (default 2: CPU processes over gloo)
    VLM_TEST_PRECISION       bf16 or fp16: every launched recipe gets --bf16 true / --fp16 true, the real CUDA
                             path on a GPU (without one, bf16 runs on the CPU; DeepSpeed refuses fp16 there);
                             unset: the recipes' own choice, fp32 on a CPU
    VLM_TEST_LAUNCH_TIMEOUT  seconds before a launched command is killed and its test fails with its output so
                             far (default 600)
`make test-gpu` (scripts/test_gpu.sh) sets the first two and runs the tests marked gpu_e2e.
"""

import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# No test may reach the hub, in this process too (huggingface_hub reads this once, when first imported): offline,
# a model id that is not local fails at once instead of after half a minute of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The records cache (vlm_recipes/records.py) of this session's runs, launched ones included: never the user's.
os.environ.setdefault("VLM_RECIPES_CACHE", tempfile.mkdtemp(prefix="vlm-recipes-test-cache-"))

import torch  # noqa: E402 - after the line above, which must come before huggingface_hub is imported

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIG = REPO / "accelerate_configs" / "zero3_offload.yaml"
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "warning", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

NUM_PROCESSES = int(os.environ.get("VLM_TEST_NUM_PROCESSES") or 2)
PRECISION = os.environ.get("VLM_TEST_PRECISION") or None
if PRECISION not in (None, "bf16", "fp16") or NUM_PROCESSES < 1:
    raise pytest.UsageError(
        f"VLM_TEST_PRECISION={PRECISION!r}, VLM_TEST_NUM_PROCESSES={NUM_PROCESSES}: the precision is bf16, fp16 "
        "or unset (the recipes' choice: fp32 on a CPU), the number of processes at least 1"
    )
# A launch still running after this many seconds is killed and fails with its output so far (a hang on a GPU).
LAUNCH_TIMEOUT = int(os.environ.get("VLM_TEST_LAUNCH_TIMEOUT") or 600)
TRAINING_DTYPE = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[PRECISION]


def requires_processes(count: int, why: str):
    """Skip a test that only means something with `count` or more processes per launch."""
    return pytest.mark.skipif(
        NUM_PROCESSES < count,
        reason=f"{why}: needs {count}+ processes, VLM_TEST_NUM_PROCESSES={NUM_PROCESSES}",
    )


def with_precision(args: list) -> list:
    """The recipe arguments with VLM_TEST_PRECISION's flag added, unless they name a precision themselves.
    Without CUDA, also --use_cpu true, which accelerate asks for before it trains in bf16 on a CPU."""
    if not PRECISION or any(str(arg).split("=", 1)[0] in ("--bf16", "--fp16") for arg in args):
        return list(args)
    return [*args, f"--{PRECISION}", "true", *([] if torch.cuda.is_available() else ["--use_cpu", "true"])]


def run_command(
    command: list, timeout: int | None = None, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    command = [str(part) for part in command]
    timeout = timeout or LAUNCH_TIMEOUT
    # Its own process group, so that a launch past its time is killed with the workers accelerate started.
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **QUIET_ENV, **(env or {})}, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # killed: say what it was doing, not only that it took too long
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"command still running after {timeout} s (VLM_TEST_LAUNCH_TIMEOUT), killed: {' '.join(command)}\n"
            f"{output_tail(stdout, stderr)}"
        ) from None
    except BaseException:  # pytest-timeout, Ctrl-C: no workers left behind on the GPU
        os.killpg(process.pid, signal.SIGKILL)
        raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(command)}\n{output_tail(stdout, stderr)}"
        )
    return result


def output_tail(stdout: str, stderr: str) -> str:
    return f"--- stdout (end) ---\n{stdout[-6000:]}\n--- stderr (end) ---\n{stderr[-10000:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def picks_a_backend(accelerate_config) -> bool:
    """Whether the accelerate config runs DeepSpeed or FSDP, which then replaces the recipe YAML's DeepSpeed config;
    one without (single_gpu.yaml, multi_gpu.yaml) is launched with --deepspeed none, as the Makefile does."""
    return bool(
        re.search(r'^distributed_type: *"?(DEEPSPEED|FSDP)', Path(accelerate_config).read_text(), re.M)
    )


def recipe_command(
    recipe: str, args: list, num_processes: int | None = None, accelerate_config=ACCELERATE_CONFIG
) -> list[str]:
    """`accelerate launch --config_file accelerate_configs/zero3_offload.yaml recipes/<recipe> ARGS`, or with
    another accelerate config; VLM_TEST_NUM_PROCESSES processes unless told, in VLM_TEST_PRECISION."""
    args = list(args)
    if not picks_a_backend(accelerate_config) and "--deepspeed" not in map(str, args):
        args += ["--deepspeed", "none"]
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--config_file", accelerate_config, "--num_processes", num_processes or NUM_PROCESSES,
        "--main_process_port", free_port(), REPO / "recipes" / recipe, *with_precision(args),
    ]  # fmt: skip
    return [str(part) for part in command]


def launch_recipe(recipe: str, args: list, num_processes: int | None = None, check: bool = True,
                  timeout: int | None = None, accelerate_config=ACCELERATE_CONFIG, env: dict | None = None):  # fmt: skip
    command = recipe_command(recipe, args, num_processes, accelerate_config)
    return run_command(command, timeout=timeout, check=check, env=env)


class _Touch:
    """Unpickling this creates a file: a pickle whose loading can be seen."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def pickle_that_touches(path) -> bytes:
    """The bytes of a pickle that, if loaded, creates `path`: a refusal must come before any loading."""
    import pickle

    return pickle.dumps(_Touch(path))


def run_script_here(script: str, args: list) -> None:
    """`python scripts/<script> ARGS`, run in this process: the same code without importing torch and transformers
    again (about 8 s a script on CI's machine). For the scripts that build fixtures; the torch RNG of the tests is
    left as it was."""
    argv = sys.argv
    sys.argv = [f"scripts/{script}", *map(str, args)]
    try:
        with torch.random.fork_rng(devices=[]):
            runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    finally:
        sys.argv = argv


def run_here(path: str, args: list, monkeypatch) -> str:
    """`python PATH ARGS` (a recipe or a script, relative to the repository) in this process, for a run that is
    expected to stop early: what it raised or exited with, as text, or "finished"."""
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    # A recipe sets the variables of a one-process world (RANK, MASTER_PORT: config.single_process_environment) in
    # os.environ; left there, every later launch of the session inherited a MASTER_PORT picked long before, which
    # something else could hold by then (EADDRINUSE in test_preflight's plain launch, seen twice in one day).
    environment = dict(os.environ)
    try:
        runpy.run_path(str(REPO / path), run_name="__main__")
    except (
        BaseException
    ) as error:  # SystemExit from argparse or a script's error exit, or the library's error
        return f"{type(error).__name__}: {error}"
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return "finished"


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    """run_in_process(path, *args) -> (outcome, stdout, stderr): `python PATH ARGS` for a script of this repository,
    run in the test's process (`run_here`), with what it printed. Saves the ~8 s a fresh interpreter spends
    importing torch and transformers on CI's machine; logging handlers made before the call still write to the
    real stderr, so only printed text is captured."""

    def run(path: str, *args) -> tuple[str, str, str]:
        capsys.readouterr()
        outcome = run_here(path, list(args), monkeypatch)
        captured = capsys.readouterr()
        return outcome, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("qwen2.5-vl") -> the folder of that family's tiny model, built once per session."""
    built = {}

    def build(family: str) -> Path:
        if family not in built:
            path = tmp_path_factory.mktemp("models") / f"tiny-{family}"
            run_script_here("make_tiny_model.py", ["--family", family, "--output_dir", path])
            built[family] = path
        return built[family]

    return build


@pytest.fixture(scope="session")
def tiny_real(tmp_path_factory):
    """tiny_real("llava-1.5-7b-hf") -> a tiny random model saved with that real checkpoint's own processor files
    (scripts/make_tiny_model.py --processor_from; tests/real_checkpoints.py says where the files are)."""
    from tests.real_checkpoints import real_folder

    built = {}

    def build(name: str) -> Path:
        if name not in built:
            path = tmp_path_factory.mktemp("real") / name
            run_script_here(
                "make_tiny_model.py", ["--processor_from", real_folder(name), "--output_dir", path]
            )
            built[name] = path
        return built[name]

    return build


@pytest.fixture(scope="session")
def tiny_llava(tiny_model) -> Path:
    return tiny_model("llava")


HUB_TOKEN = "hf_SECRETdoNotWriteMe0123456789"  # never used: push_to_hub is off, so nothing goes online


def llava_recipe_args(tiny_llava, demo_data, output_dir, *extra) -> list:
    return [
        "--config", "recipes/configs/llava_demo.yaml", "--model_name_or_path", tiny_llava,
        "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", output_dir,
        "--overwrite_output_dir", "false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def llava_zero3_run(tiny_llava, demo_data, tmp_path_factory):
    """(output_dir, args, result) of the tiny LLaVA trained 30 steps under the shared ZeRO-3 offload config,
    checkpoints at 15 and 30. One run serves the recipe's tests (tests/test_llava_recipe.py) and the after-training
    scripts' (tests/test_after_training.py): each launch costs about 20 s of start-up on CI's machine."""
    output_dir = tmp_path_factory.mktemp("llava") / "full"
    args = llava_recipe_args(
        tiny_llava, demo_data, output_dir,
        "--max_steps", "30", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--learning_rate", "2e-3", "--logging_steps", "5", "--save_strategy", "steps", "--save_steps", "15",
        "--hub_token", HUB_TOKEN, "--report_to", "tensorboard",  # what could leak the token, written
        "--include_num_input_tokens_seen", "true",  # so that the training plot has a throughput curve
    )  # fmt: skip
    # A cache of its own: its preflight checks the records (shared out between the processes) whatever ran before.
    result = launch_recipe("llava.py", args, env={"VLM_RECIPES_CACHE": str(output_dir.parent / "cache")})
    return output_dir, args, result


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    run_script_here("make_demo_data.py", ["--output_dir", path, "--num_train", "96", "--num_test", "16"])
    return path


# ---- what the end-to-end tests check --------------------------------------------------------------------------

TINY_HIDDEN_SIZE = 64  # the tiny models' text hidden size, which fills the bucket-size "auto"s
# A resumed run's losses against the uninterrupted run's: in fp32 on a CPU they repeat to the last digits; in
# 16 bits on a GPU they drift a little (rounding, and kernels such as attention's backward are not deterministic).
RESUME_RTOL = 1e-3 if PRECISION is None else 2e-2


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
    # fp32 on CPU; on a GPU VLM_TEST_PRECISION's, fp16 with DeepSpeed's dynamic loss scaling (loss_scale 0)
    assert config["bf16"]["enabled"] is (PRECISION == "bf16")
    assert config["fp16"]["enabled"] is (PRECISION == "fp16")
    if PRECISION == "fp16":
        assert config["fp16"]["loss_scale"] == 0
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == TINY_HIDDEN_SIZE * TINY_HIDDEN_SIZE
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * TINY_HIDDEN_SIZE * TINY_HIDDEN_SIZE)
    assert zero["stage3_param_persistence_threshold"] == 10 * TINY_HIDDEN_SIZE
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert "scheduler" not in config  # the Trainer's --lr_scheduler_type is what runs


# Weights that hold the same numbers: bit for bit in fp32; in a bf16/fp16 run, which computes with 16-bit copies of
# fp32 numbers, the same once in that dtype, give or take one rounding (torch.testing's default tolerances for it).
RTOL, ATOL = {None: (0.0, 0.0), "bf16": (1.6e-2, 1e-5), "fp16": (1e-3, 1e-5)}[PRECISION]


def equal_in_training_precision(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(actual.to(TRAINING_DTYPE), expected.to(TRAINING_DTYPE), rtol=RTOL, atol=ATOL)


def assert_equal_in_training_precision(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(
        actual.to(TRAINING_DTYPE), expected.to(TRAINING_DTYPE), rtol=RTOL, atol=ATOL, msg=name
    )


def assert_saved_equals_trained(model_class, output_dir, checkpoint: str, initial_dir) -> set[str]:
    """The model saved in output_dir reloads with from_pretrained and equals, tensor for tensor, the fp32
    weights DeepSpeed trained (consolidated from the ZeRO shards of `checkpoint`; in a bf16/fp16 run, as that
    dtype). Returns the names of the tensors that differ from the initial model's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    output_dir = Path(output_dir)
    weight_bytes = (output_dir / "model.safetensors").stat().st_size
    assert weight_bytes > 500_000 * TRAINING_DTYPE.itemsize // 4  # full weights, not a ZeRO stub
    reloaded = reload_complete(model_class, output_dir)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(output_dir / checkpoint))
    assert trained and set(trained) <= set(reloaded)
    for name, tensor in trained.items():
        assert_equal_in_training_precision(reloaded[name], tensor, name)
    return changed_from(model_class, initial_dir, reloaded)


def assert_planner_counts_what_the_run_trained(recipe: str, args: list, model_config_dir=None) -> None:
    """The memory planner's trainable and total parameter counts for a recipe's arguments (memory.planned_run,
    as the recipe's host-RAM check calls it) equal what the run trained (run_stats: requires_grad after the
    recipe's freezing and PEFT). `model_config_dir`: where the config of a model the recipe assembles itself
    was saved (CheXagent's stage 1). A recipe that freezes or adapts what the planner does not expect fails."""
    from vlm_recipes.config import load_recipe, parse_recipe_args, pop_flag, recipe_argument_classes
    from vlm_recipes.memory import load_model_config, parameter_split, planned_run
    from vlm_recipes.run_stats import read_run_stats

    own_classes, default_config = recipe_argument_classes(REPO / "recipes" / f"{recipe}.py")
    parts = getattr(
        load_recipe(REPO / "recipes" / f"{recipe}.py"), "PARTS", None
    )  # as its host-RAM check does
    _, argv = pop_flag([str(arg) for arg in args], "deepspeed")  # parsed here without DeepSpeed's set-up
    model_args, data_args, training_args, *_ = parse_recipe_args(
        default_config, [*argv, "--deepspeed", "none"], own_classes
    )
    model_config = load_model_config(str(model_config_dir)) if model_config_dir else None
    shape, setup = planned_run(model_args, data_args, training_args, model_config=model_config, parts=parts)
    trainable, frozen = parameter_split(shape, setup)
    for rank in read_run_stats(training_args.output_dir):
        counted = rank["parameter_elements_trainable"], rank["parameter_elements_total"]
        assert counted == (trainable, trainable + frozen), (
            setup.mode,
            counted,
            (trainable, trainable + frozen),
        )


def reload_complete(model_class, folder) -> dict:
    """The state dict of the model saved in `folder`, which must hold every tensor the class expects: a missing
    tensor only warns in from_pretrained, and is then randomly initialised."""
    model, info = model_class.from_pretrained(folder, output_loading_info=True)
    problems = {
        kind: names
        for kind, names in info.items()
        if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and names
    }
    assert not problems, problems
    return model.state_dict()


def changed_from(model_class, initial_dir, reloaded: dict) -> set[str]:
    initial = model_class.from_pretrained(initial_dir).state_dict()
    return {name for name in initial if not equal_in_training_precision(initial[name], reloaded[name])}


def assert_saved_is_complete_and_moved(model_class, output_dir, initial_dir) -> set[str]:
    """For runs without DeepSpeed shards to compare with: the saved model reloads with every tensor; returns the
    names of the tensors that differ from the initial model's."""
    return changed_from(model_class, initial_dir, reload_complete(model_class, output_dir))


# ---- conversations and their labels, for the recipes' masking tests -----------------------------------------------


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def labelled_spans(processor, sample) -> list[str]:
    """The labelled tokens, decoded as runs: one string per contiguous labelled span."""
    from vlm_recipes.masking import IGNORE_INDEX

    spans, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist(), strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(processor.tokenizer.decode(current))
            current = []
    return spans + ([processor.tokenizer.decode(current)] if current else [])
