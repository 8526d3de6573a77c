"""Every shipped accelerate/DeepSpeed config pair that can run on CPU trains the tiny LLaVA on 2 processes: the
trained parts move and the frozen tower does not, each rank owns the share of the parameters its config gives it
(a 1/N shard under ZeRO-3, and under FSDP2 on GPUs: on a CPU accelerate runs fsdp2.yaml as plain data parallel),
and the saved model reloads with every tensor, equal to what DeepSpeed's
optimizer trained; scripts/show_ds_config.py shows exactly the config a run handed to DeepSpeed; the
multi-node config runs as 2 machines x 1 process over loopback through scripts/launch_slurm.sh. The DeepSpeed
configs and single_gpu also run on CUDA in bf16 and fp16 (`make test-gpu`, marked gpu_e2e)."""

import json
import os
import runpy
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import LlavaForConditionalGeneration

from tests.conftest import (
    NUM_PROCESSES,
    PRECISION,
    QUIET_ENV,
    REPO,
    RESUME_RTOL,
    assert_equal_in_training_precision,
    assert_saved_equals_trained,
    assert_saved_is_complete_and_moved,
    free_port,
    launch_recipe,
    logged_losses,
    recipe_command,
    reload_complete,
    requires_processes,
    run_command,
    run_here,
    with_precision,
)
from vlm_recipes.ds_config import auto_keys, fp16_problem, get_dotted
from vlm_recipes.memory import DEEPSPEED_CONFIGS  # every shipped DeepSpeed JSON, the planner's list
from vlm_recipes.run_stats import read_run_stats

pytestmark = pytest.mark.distributed

OTHER_CONFIGS = [
    pytest.param(
        "multi_gpu", marks=[requires_processes(2, "data parallel across processes"), pytest.mark.gpu_e2e]
    ),
    pytest.param("fsdp2", marks=[requires_processes(2, "sharded across processes"), pytest.mark.gpu_e2e]),
    pytest.param("single_gpu", marks=pytest.mark.gpu_e2e),
]


# DeepSpeed's dynamic fp16 loss scale starts at 2**16 (initial_scale_power) and skips each step whose gradients
# overflow until it has come down: on one H200 all three of the tiny LLaVA's first fp16 steps were skipped and nothing
# trained. In fp16 the runs get enough steps to train after that.
STEPS = 12 if PRECISION == "fp16" else 3


def demo_args(tiny_llava, demo_data, output_dir, *extra):
    return [
        "--config", "recipes/configs/llava_demo.yaml", "--model_name_or_path", tiny_llava,
        "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", output_dir,
        "--max_steps", STEPS, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1", *extra,
    ]  # fmt: skip


def launch_with(config: str, args: list, num_processes: int | None = None):
    return launch_recipe(
        "llava.py", args, num_processes, accelerate_config=REPO / "accelerate_configs" / f"{config}.yaml"
    )


# Variants of zero2_offload and zero3_offload that differ in one setting: their CPU runs are in `make test-extended`.
VARIANTS = {"zero2_offload_gpu_accum", "zero3_offload_optimizer"}


def assert_trained_and_sharded_as_configured(
    output_dir, changed: set[str], sharded: bool, processes=NUM_PROCESSES
):
    """The optimizer moved the trained parts and only those; each rank owned a 1/N shard of the parameters
    where `sharded`, all of them otherwise."""
    assert any("multi_modal_projector" in name for name in changed), changed
    assert any("language_model" in name for name in changed), changed
    assert not any("vision_tower" in name for name in changed), changed  # frozen
    ranks = read_run_stats(output_dir)
    assert len(ranks) == processes
    for rank in ranks:
        owned, total = rank["parameter_elements_owned"], rank["parameter_elements_total"]
        assert total > 0, rank
        if sharded and processes > 1:
            assert total / processes <= owned <= 1.1 * total / processes, rank  # (+ padding)
        else:
            assert owned == total, rank


@pytest.mark.gpu_e2e
@pytest.mark.parametrize(
    "config", [pytest.param(c, marks=pytest.mark.extended) if c in VARIANTS else c for c in DEEPSPEED_CONFIGS]
)
def test_deepspeed_config_trains_and_show_ds_config_matches_the_run(
    tiny_llava, demo_data, tmp_path, config, request, monkeypatch, capsys
):
    # the shared config: the tiny LLaVA's shared run (tests/conftest.py), no launch of its own
    if config == "zero3_offload":
        output_dir, args, _ = request.getfixturevalue("llava_zero3_run")
        assert sorted(logged_losses(output_dir)) == [5, 10, 15, 20, 25, 30]
        checkpoint = "checkpoint-30"
    else:
        output_dir = tmp_path / config
        args = demo_args(tiny_llava, demo_data, output_dir, "--save_strategy", "steps", "--save_steps", STEPS)
        if PRECISION == "fp16" and fp16_problem(
            json.loads((REPO / "ds_configs" / f"{config}.json").read_text())
        ):
            pytest.skip(
                "refused in fp16 (test_fp16_with_the_config_that_never_trained_in_fp16_is_refused_...)"
            )
        launch_with(config, args)
        assert sorted(logged_losses(output_dir)) == list(range(1, STEPS + 1))
        checkpoint = f"checkpoint-{STEPS}"
    # full weights whatever the ZeRO stage, every tensor there, equal to what DeepSpeed's optimizer trained
    changed = assert_saved_equals_trained(LlavaForConditionalGeneration, output_dir, checkpoint, tiny_llava)
    assert_trained_and_sharded_as_configured(output_dir, changed, sharded=config.startswith("zero3"))
    if config != "zero3_offload":  # the shared run's shards: tests/test_after_training.py converts them
        # scripts/zero_to_hf.py on this stage's shards gives the model the run saved
        converted = tmp_path / "converted"
        outcome = run_here("scripts/zero_to_hf.py", [output_dir / checkpoint, converted], monkeypatch)
        assert outcome == "finished", outcome
        saved = reload_complete(LlavaForConditionalGeneration, output_dir)
        for name, tensor in reload_complete(LlavaForConditionalGeneration, converted).items():
            assert_equal_in_training_precision(tensor, saved[name], name)
    used = json.loads((output_dir / "ds_config_resolved.json").read_text())
    # scripts/show_ds_config.py for the same arguments, run in this process: the config the run used
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [
        "scripts/show_ds_config.py", "--recipe", "llava", "--world_size", str(NUM_PROCESSES), "--json",
        "--accelerate_config", f"accelerate_configs/{config}.yaml", "--", *map(str, with_precision(args)),
    ])  # fmt: skip
    runpy.run_path(str(REPO / "scripts" / "show_ds_config.py"), run_name="__main__")
    assert json.loads(capsys.readouterr().out) == used


@pytest.mark.parametrize("config", OTHER_CONFIGS)
def test_other_accelerate_configs_train(tiny_llava, demo_data, tmp_path, config):
    output_dir = tmp_path / config
    processes = 1 if config == "single_gpu" else NUM_PROCESSES
    args = demo_args(tiny_llava, demo_data, output_dir, "--save_strategy", "steps", "--save_steps", STEPS - 1,
                     "--overwrite_output_dir", "false")  # fmt: skip
    launch_with(config, args, processes)
    assert sorted(logged_losses(output_dir)) == list(range(1, STEPS + 1))
    if config != "fsdp2":  # without DeepSpeed or FSDP: the recipe loads the weights (RecipeTrainer)
        # Rerun after a crash past the checkpoint: it resumes from the checkpoint's weights, not the initial ones
        # (the Trainer's own load matched none of LLaVA's saved names, huggingface/transformers#43701).
        interrupted = tmp_path / f"{config}-interrupted"
        shutil.copytree(
            output_dir, interrupted, ignore=shutil.ignore_patterns("run_stats", f"checkpoint-{STEPS}")
        )
        (interrupted / "model.safetensors").unlink()
        (interrupted / "trainer_state.json").unlink()
        log = launch_with(config, [interrupted if a == output_dir else a for a in args], processes).stderr
        assert f"loading the model's weights from {interrupted / f'checkpoint-{STEPS - 1}'}" in log, log[
            -3000:
        ]
        resumed, original = logged_losses(interrupted), logged_losses(output_dir)
        assert resumed[STEPS] == pytest.approx(original[STEPS], rel=RESUME_RTOL), (resumed, original)
    assert not (output_dir / "ds_config_resolved.json").exists()  # no DeepSpeed here
    changed = assert_saved_is_complete_and_moved(LlavaForConditionalGeneration, output_dir, tiny_llava)
    # accelerate turns FSDP on only on GPUs: on a CPU it runs fsdp2.yaml as plain data parallel over gloo (each rank
    # holds every parameter), so sharding is checked where FSDP2 really runs (`make test-gpu` with 2+ GPUs).
    sharded = config == "fsdp2" and torch.cuda.is_available()
    assert_trained_and_sharded_as_configured(output_dir, changed, sharded=sharded, processes=processes)


def test_show_ds_config_explains_each_auto_offline(monkeypatch, capsys):
    # In this process (the script's code, without importing torch again): llava.yaml on 8 GPUs in bf16, and one
    # override, so that a value taken from the YAML instead of the command line would show.
    monkeypatch.setattr(sys, "argv", ["scripts/show_ds_config.py", "--recipe", "llava", "--world_size", "8",
                                      "--", "--bf16", "true", "--gradient_accumulation_steps", "2"])  # fmt: skip
    runpy.run_path(str(REPO / "scripts" / "show_ds_config.py"), run_name="__main__")
    out = capsys.readouterr().out
    explained = {}
    for line in out.split('Where each "auto"', 1)[1].splitlines()[1:]:
        if " = " in line and "    <- " in line:
            key, rest = line.strip().split(" = ", 1)
            value, source = rest.split("    <- ", 1)
            explained[key] = (json.loads(value), source)
    config = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    assert sorted(explained) == sorted(auto_keys(config))  # every "auto", each once
    recipe = yaml.safe_load((REPO / "recipes" / "configs" / "llava.yaml").read_text())
    micro, hidden = recipe["per_device_train_batch_size"], 4096  # llava-1.5-7b's text hidden size
    expected = {
        "fp16.enabled": False, "bf16.enabled": True,
        "optimizer.params.lr": recipe["learning_rate"], "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8, "optimizer.params.weight_decay": recipe["weight_decay"],
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
        "gradient_accumulation_steps": 2, "gradient_clipping": recipe["max_grad_norm"],
        "train_batch_size": 8 * micro * 2, "train_micro_batch_size_per_gpu": micro,
    }  # fmt: skip
    assert {key: value for key, (value, _) in explained.items()} == expected
    assert explained["train_batch_size"][1] == (
        "world size x per_device_train_batch_size x gradient_accumulation_steps"
    )
    assert "(hidden_size = 4096)" in explained["zero_optimization.reduce_bucket_size"][1]
    # and the JSON it prints above is that config with those values in place
    printed = json.loads(out.split("\n{", 1)[1].rsplit("\n}", 1)[0].join("{}"))
    for key, value in expected.items():
        assert get_dotted(printed, key) == value, key


def fake_slurm_tools(bin_dir, gpus_per_node: int):
    """srun that starts its command once per node, in parallel, as Slurm would, each "node" with GPUs of its own
    where there are GPUs; scontrol that names the nodes."""
    first, last = f"$((node * {gpus_per_node}))", f"$((node * {gpus_per_node} + {gpus_per_node - 1}))"
    visible = f"CUDA_VISIBLE_DEVICES=$(seq -s, {first} {last}) " if torch.cuda.is_available() else ""
    scripts = {
        "srun": "#!/usr/bin/env bash\nshift  # --kill-on-bad-exit=1\npids=()\n"
        f'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node {visible}"$@" & pids+=($!); done\n'
        'status=0; for pid in "${pids[@]}"; do wait $pid || status=1; done; exit $status\n',
        "scontrol": "#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.1\n",
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


# Two "nodes" on this one machine: on a CPU one process each; on GPUs, half the processes each, every node with
# its own GPUs (CUDA_VISIBLE_DEVICES), as on two real nodes.
GPUS_PER_NODE = max(NUM_PROCESSES // 2, 1) if torch.cuda.is_available() else 1


@pytest.mark.gpu_e2e
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="two 'nodes' on one machine need a GPU each",
)
def test_multi_node_config_on_loopback_through_launch_slurm(tiny_llava, demo_data, tmp_path):
    fake_slurm_tools(tmp_path, GPUS_PER_NODE)
    output_dir = tmp_path / "multi-node"
    env = {
        **os.environ, **QUIET_ENV, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]", "GPUS_PER_NODE": str(GPUS_PER_NODE), "MAIN_PORT": str(free_port()),
        "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(REPO),
    }  # fmt: skip
    command = [
        "bash",
        "scripts/launch_slurm.sh",
        "recipes/llava.py",
        *with_precision(demo_args(tiny_llava, demo_data, output_dir)),
    ]
    result = subprocess.run(
        [str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"DeepSpeed config as resolved for this run (world size {2 * GPUS_PER_NODE})" in result.stdout
    assert sorted(logged_losses(output_dir)) == list(range(1, STEPS + 1))
    LlavaForConditionalGeneration.from_pretrained(output_dir)


def test_fp16_with_the_config_that_never_trained_in_fp16_is_refused_before_anything_loads(
    tiny_llava, demo_data, tmp_path
):
    # On a CPU too: the check reads the arguments and the JSON only (DeepSpeed itself refuses fp16 on a CPU later).
    args = [*demo_args(tiny_llava, demo_data, tmp_path / "out"), "--fp16", "true"]
    refused = run_command(
        recipe_command("llava.py", args, 1, REPO / "accelerate_configs" / "zero2_offload_gpu_accum.yaml"),
        check=False,
    )
    assert refused.returncode != 0 and "Loading weights" not in refused.stderr
    assert "does not train on DeepSpeed 0.19.8" in refused.stderr, refused.stderr[-3000:]
    assert "zero2_offload.json" in refused.stderr  # the fix is named
    assert not (tmp_path / "out").exists()


def test_every_problem_of_a_deepspeed_config_is_listed_before_loading_weights(
    tiny_llava, demo_data, tmp_path
):
    change = {
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto"}},
        "gradient_accumulation_steps": 1, "train_micro_batch_size_per_gpu": 8,
        "comet": {"enabled": True, "api_key": "SECRET-one"}, "my_monitor": {"db": {"password": "SECRET-two"}},
    }  # fmt: skip
    config = {**json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text()), **change}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    accelerate_yaml = (REPO / "accelerate_configs" / "zero3_offload.yaml").read_text()
    (tmp_path / "accelerate.yaml").write_text(
        accelerate_yaml.replace("ds_configs/zero3_offload.json", str(tmp_path / "ds.json"))
    )
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
        tmp_path / "accelerate.yaml", "--num_processes", 1, "--main_process_port", free_port(),
        REPO / "recipes" / "llava.py", *demo_args(tiny_llava, demo_data, tmp_path / "out"),
    ]  # fmt: skip
    result = run_command(command, check=False)
    assert result.returncode != 0 and "Loading weights" not in result.stderr
    for message in [  # all four in one run: one edit of the file fixes them
        "holds credentials (comet.api_key, my_monitor.db.password)",
        "has a scheduler block (WarmupDecayLR), which would silently replace --lr_scheduler_type cosine",
        "ds gradient_accumulation_steps=1 vs hf gradient_accumulation_steps=2",
        "ds train_micro_batch_size_per_gpu=8 vs hf per_device_train_batch_size=2",
    ]:
        assert message in result.stderr, result.stderr[-3000:]
    assert "SECRET" not in result.stdout + result.stderr  # the keys are named, their values never shown
    assert not (tmp_path / "out").exists()  # nothing written: not even ds_config_resolved.json
