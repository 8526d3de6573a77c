"""The LLaVA recipe end to end: real `accelerate launch`, real ZeRO-3 + CPU offload config, 2 processes over
gloo, tiny model. Checks what a user checks: the loss falls, the DeepSpeed config holds what the arguments
imply, the saved model reloads and equals the trained weights, LoRA saves a loadable adapter, a re-run resumes.
The tests marked gpu_e2e also run on CUDA in bf16 and fp16 (`make test-gpu`, see tests/conftest.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from tests.conftest import (
    HUB_TOKEN,
    NUM_PROCESSES,
    QUIET_ENV,
    REPO,
    RESUME_RTOL,
    assert_equal_in_training_precision,
    assert_planner_counts_what_the_run_trained,
    assert_resolved_like_arguments,
    assert_saved_equals_trained,
    launch_recipe,
    llava_recipe_args,
    logged_losses,
    output_tail,
    recipe_command,
    requires_processes,
    run_command,
    run_here,
)
from vlm_recipes.run_stats import read_run_stats
from vlm_recipes.training import CHECKPOINT_COMPLETE, is_complete_checkpoint

pytestmark = pytest.mark.distributed


@pytest.mark.gpu_e2e
def test_full_finetune_loss_falls(llava_zero3_run):
    output_dir, _, _ = llava_zero3_run
    losses = logged_losses(output_dir)
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < 0.5 * losses[5], losses


def test_the_memory_planner_counts_what_the_recipe_trains(llava_zero3_run):
    _, args, _ = llava_zero3_run
    assert_planner_counts_what_the_run_trained("llava", args)  # projector + language model


@pytest.mark.gpu_e2e
@requires_processes(2, "the records are shared out among the processes")
def test_preflight_checks_each_record_once_across_the_processes(llava_zero3_run, demo_data):
    _, _, result = llava_zero3_run
    reports = [line for line in result.stdout.splitlines() if line.startswith("preflight: all")]
    shares = " + ".join(str(len(range(rank, 96, NUM_PROCESSES))) for rank in range(NUM_PROCESSES))
    assert reports == [
        f"preflight: all 96 records of {demo_data / 'train.json'} become training samples "
        f"(checked by {NUM_PROCESSES} processes: {shares} records)"
    ]


@pytest.mark.gpu_e2e
def test_no_file_the_run_writes_holds_the_hub_token(llava_zero3_run):
    output_dir, _, result = llava_zero3_run
    written = [path for path in output_dir.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    # The files that could hold it are there: the Trainer's pickled arguments, TensorBoard's copy of them.
    assert {"training_args.bin", "trainer_state.json", "ds_config_resolved.json"} <= names
    assert (output_dir / "checkpoint-15" / "training_args.bin").is_file()
    assert any(name.startswith("events.out.tfevents") for name in names)
    assert [path for path in written if HUB_TOKEN.encode() in path.read_bytes()] == []
    assert HUB_TOKEN not in result.stdout + result.stderr


@pytest.mark.gpu_e2e
def test_resolved_deepspeed_config_matches_the_arguments(llava_zero3_run):
    # (a one-process run's: tests/test_multi_process.py, whose first run is one process)
    output_dir, _, result = llava_zero3_run
    config = json.loads((output_dir / "ds_config_resolved.json").read_text())
    assert_resolved_like_arguments(
        config, world_size=NUM_PROCESSES, micro=4, accumulation=2, learning_rate=2e-3
    )
    assert f"DeepSpeed config as resolved for this run (world size {NUM_PROCESSES})" in result.stdout


@pytest.mark.gpu_e2e
def test_saved_model_reloads_and_equals_trained_weights(llava_zero3_run, tiny_llava):
    output_dir, _, _ = llava_zero3_run
    assert (output_dir / "processor_config.json").is_file() and (output_dir / "tokenizer.json").is_file()
    changed = assert_saved_equals_trained(
        LlavaForConditionalGeneration, output_dir, "checkpoint-30", tiny_llava
    )
    assert not any("vision_tower" in name for name in changed)  # frozen
    assert any("multi_modal_projector" in name for name in changed)
    assert any("language_model" in name for name in changed)


def steps_run_by_every_rank(output_dir) -> list[int]:
    """Optimizer steps each rank ran in the last launch into output_dir (RunStatsCallback counts them)."""
    return [rank["steps"] for rank in read_run_stats(output_dir)]


@pytest.mark.gpu_e2e
def test_rerun_resumes_from_last_complete_checkpoint(llava_zero3_run, tmp_path):
    output_dir, args, _ = llava_zero3_run
    interrupted = tmp_path / "interrupted"
    shutil.copytree(output_dir, interrupted, ignore=shutil.ignore_patterns("run_stats"))
    # As if the run died while writing checkpoint-30: no final model; rank 0 had written its trainer_state.json,
    # the other ranks had not finished their DeepSpeed shards, so no rank marked the checkpoint complete.
    (interrupted / "model.safetensors").unlink()
    (interrupted / "trainer_state.json").unlink()
    (interrupted / "checkpoint-30" / CHECKPOINT_COMPLETE).unlink()
    for shard in (interrupted / "checkpoint-30" / "global_step30").glob("*zero_pp_rank_1_*"):
        shard.unlink()
    assert (interrupted / "checkpoint-30" / "trainer_state.json").is_file()
    rerun_args = [str(interrupted) if str(a) == str(output_dir) else a for a in args]
    # with the first run's caches, as a rerun on the same machine has them
    result = launch_recipe(
        "llava.py", rerun_args, env={"VLM_RECIPES_CACHE": str(output_dir.parent / "cache")}
    )
    log = result.stdout + result.stderr
    # the records' check is read back, not done again
    assert "become training samples (the check of an earlier run with the same records and processor" in log
    assert f"resuming from {interrupted / 'checkpoint-15'}" in log
    assert f"ignoring {interrupted / 'checkpoint-30'}" in log
    # Only the remaining 15 steps ran, and from the checkpoint's state: a rerun that ignored the checkpoint (or
    # loaded its step count but not its weights and optimizer) would run 30 steps, or end at other losses.
    assert steps_run_by_every_rank(interrupted) == [15] * NUM_PROCESSES
    state = json.loads((interrupted / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    # The resumed run repeats steps 16-30 on the same batches from the same state: same losses.
    original, resumed = logged_losses(output_dir), logged_losses(interrupted)
    for step in (20, 25, 30):
        assert resumed[step] == pytest.approx(original[step], rel=RESUME_RTOL), (step, original, resumed)
    assert (interrupted / "model.safetensors").is_file()
    assert is_complete_checkpoint(interrupted / "checkpoint-30")  # written again, on every rank, and marked


@pytest.mark.gpu_e2e
@requires_processes(2, "kills the launcher and both ranks mid-run")
def test_sigkill_mid_training_then_rerun_resumes_and_ends_at_the_same_loss(llava_zero3_run, tmp_path):
    output_dir, args, _ = llava_zero3_run
    killed = tmp_path / "killed"
    run_args = [str(killed) if str(a) == str(output_dir) else a for a in args] + ["--save_steps", "5"]
    process = subprocess.Popen(
        recipe_command("llava.py", run_args), cwd=REPO, env={**os.environ, **QUIET_ENV},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    # Killed the moment rank 0's last file of checkpoint-10 appears: the other rank may still be writing then.
    while not (killed / "checkpoint-10" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint-10"
        time.sleep(0.01)
    # The launcher and both ranks (torch's launcher gives its workers their own sessions), no clean-up.
    for victim in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        victim.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists()
    marked = sorted(
        int(p.parent.name.split("-")[1]) for p in killed.glob(f"checkpoint-*/{CHECKPOINT_COMPLETE}")
    )

    result = launch_recipe("llava.py", run_args)  # the same command again
    log = result.stdout + result.stderr
    resumed_from = int(re.search(r"resuming from .*checkpoint-(\d+)", log).group(1))
    # From the last checkpoint every rank finished (5, or 10 if the marker was written before the kill), never
    # from one that only rank 0 finished.
    assert marked and resumed_from == marked[-1] and resumed_from in (5, 10), (marked, resumed_from)
    if resumed_from == 5:
        assert f"ignoring {killed / 'checkpoint-10'}" in log
    assert steps_run_by_every_rank(killed) == [30 - resumed_from] * NUM_PROCESSES
    # Same data order, same RNG state from the checkpoint: the uninterrupted run's losses.
    original, resumed = logged_losses(output_dir), logged_losses(killed)
    assert resumed[30] == pytest.approx(original[30], rel=RESUME_RTOL), (resumed_from, original, resumed)
    assert (killed / "model.safetensors").is_file()


def test_finished_output_dir_is_not_overwritten(llava_zero3_run):
    output_dir, args, _ = llava_zero3_run
    before = (output_dir / "model.safetensors").stat().st_mtime_ns
    result = run_command([sys.executable, "recipes/llava.py", *args], check=False, timeout=300)
    assert result.returncode != 0
    assert (
        "already holds a finished model" in result.stderr and "--overwrite_output_dir true" in result.stderr
    )
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_run_whose_gradients_go_non_finite_stops_before_saving_that_step(tiny_llava, demo_data, tmp_path):
    """A learning rate of 1e30 makes the third step's gradients overflow under the shared ZeRO-3 offload config on
    every process; the run stops there with the step, the last good checkpoint and the fixes, and writes nothing
    after it (the Trainer would otherwise train on to the end, logging `loss: 0` for NaN losses)."""
    output_dir = tmp_path / "out"
    args = llava_recipe_args(
        tiny_llava, demo_data, output_dir,
        "--max_steps", "8", "--learning_rate", "1e30", "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1",
    )  # fmt: skip
    result = launch_recipe("llava.py", args, check=False, timeout=300)
    assert result.returncode != 0
    said = re.search(r"NonFiniteGradientError: step (\d+): the gradient norm is (nan|inf)\.", result.stderr)
    assert said, output_tail(result.stdout, result.stderr)
    stopped_at = int(said.group(1))
    assert 1 < stopped_at < 8
    last_good = output_dir / f"checkpoint-{stopped_at - 1}"
    assert f"{last_good} is the last complete checkpoint" in result.stderr
    assert "--torch_compile false" in result.stderr and "try a tenth" in result.stderr
    saved = sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))
    assert saved == list(range(1, stopped_at)), saved
    assert is_complete_checkpoint(last_good)
    assert not (output_dir / "model.safetensors").exists()


def test_a_non_finite_gradient_norm_is_left_to_the_loss_scaler_in_fp16(tmp_path):
    """fp16's loss scaler skips overflowing steps on purpose and the Trainer logs their norm as inf: not stopped.
    Finite norms and logs without one are never stopped."""
    from types import SimpleNamespace

    from vlm_recipes.training import NonFiniteGradientError, StopOnNonFiniteGradientCallback

    callback, state = StopOnNonFiniteGradientCallback(), SimpleNamespace(global_step=4)
    fp16, bf16 = (SimpleNamespace(fp16=flag, output_dir=str(tmp_path)) for flag in (True, False))
    callback.on_log(fp16, state, None, logs={"loss": 0.0, "grad_norm": float("inf")})
    callback.on_log(bf16, state, None, logs={"loss": 1.5, "grad_norm": 3.2})
    callback.on_log(bf16, state, None, logs={"train_runtime": 9.0})
    with pytest.raises(
        NonFiniteGradientError, match="step 4: the gradient norm is nan. .*No checkpoint was saved"
    ):
        callback.on_log(bf16, state, None, logs={"loss": 0.0, "grad_norm": float("nan")})


def test_the_stop_names_the_weights_a_nan_reached_and_so_where_it_began(tmp_path):
    """A NaN made in the backward of the third of five layers reaches that layer's weights and the ones before it,
    not the two after it: the message names the third as the last, where it began."""
    from types import SimpleNamespace

    import torch

    from vlm_recipes.training import NonFiniteGradientError, StopOnNonFiniteGradientCallback

    class NanInBackward(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.clone())
        backward = staticmethod(lambda ctx, grad: grad * float("nan"))

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(5))
    x = torch.randn(2, 4)
    for k, layer in enumerate(layers):  # the NaN enters the gradient of layer 2's output
        x = torch.tanh(layer(NanInBackward.apply(x) if k == 3 else x))
    x.sum().backward()
    torch.optim.SGD(layers.parameters(), lr=0.1).step()
    finite = [torch.isfinite(layer.weight).all().item() for layer in layers]
    assert finite == [False, False, False, True, True]
    state, args = SimpleNamespace(global_step=7), SimpleNamespace(fp16=False, output_dir=str(tmp_path))
    with pytest.raises(NonFiniteGradientError) as stopped:
        StopOnNonFiniteGradientCallback().on_log(
            args, state, None, logs={"grad_norm": float("nan")}, model=layers
        )
    assert "6 of 10 weight tensors are now NaN or infinite, from 0.weight to 2.bias" in str(stopped.value)
    assert "began at or just after 2.bias" in str(stopped.value)


@pytest.mark.gpu_e2e
def test_lora_adapter_is_saved_and_loaded_by_the_after_training_scripts(
    tiny_llava, demo_data, tmp_path, monkeypatch, capsys
):
    """The LoRA run's adapter: trained, with the projector; infer.py and evaluate.py load it on its base;
    zero_to_hf.py turns the run's ZeRO-3 checkpoint into the same adapter."""
    from peft import PeftModel

    from vlm_recipes.inference import load_for_inference

    output_dir = tmp_path / "lora"
    args = llava_recipe_args(tiny_llava, demo_data, output_dir)
    args[1] = "recipes/configs/llava_lora.yaml"
    args += [
        "--max_steps", "10", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--learning_rate", "2e-3", "--lora_r", "8", "--lora_alpha", "16", "--max_length", "128",
        "--save_strategy", "steps", "--save_steps", "10", "--report_to", "none", "--dataloader_num_workers", "0",
        "--logging_steps", "5",
    ]  # fmt: skip
    launch_recipe("llava.py", args)
    assert (output_dir / "adapter_config.json").is_file()
    assert not (output_dir / "model.safetensors").exists()
    adapter = load_file(output_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # lora_B starts at zero: it trained
    assert any("multi_modal_projector" in name for name in adapter)  # the projector is saved with it
    assert not any("vision_tower" in name for name in adapter)
    model, processor = load_for_inference(str(output_dir), device="cpu")
    assert isinstance(model, PeftModel)
    assert processor.tokenizer.padding_side == "left"
    assert_planner_counts_what_the_run_trained("llava", args)  # adapters + the projector's trained copy

    # the scripts of the README's "After training", each run in this process
    capsys.readouterr()
    question = ["--prompt", "What color is the shape? Answer with one word.", "--max_new_tokens", "4"]
    image = ["--image", demo_data / "images" / "test_0000.png"]
    assert (
        run_here("scripts/infer.py", ["--model_name_or_path", output_dir, *image, *question], monkeypatch)
        == "finished"
    )
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("answer:")
    predictions = tmp_path / "predictions.jsonl"
    evaluate = ["--model_name_or_path", output_dir, "--dataset_path", demo_data / "test.json",
                "--image_root", demo_data, "--predictions_file", predictions]  # fmt: skip
    assert run_here("scripts/evaluate.py", evaluate, monkeypatch) == "finished"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 16 and len(predictions.read_text().splitlines()) == 16  # every held-out record
    converted = tmp_path / "converted"
    outcome = run_here("scripts/zero_to_hf.py", [output_dir / "checkpoint-10", converted], monkeypatch)
    assert outcome == "finished", outcome
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "PEFT adapter"
    reconverted = load_file(converted / "adapter_model.safetensors")
    assert set(reconverted) == set(adapter)
    for name, tensor in adapter.items():
        assert_equal_in_training_precision(reconverted[name], tensor, name)


def test_recipe_help_lists_hf_argument_names(run_in_process):
    outcome, out, _ = run_in_process("recipes/llava.py", "--help")
    assert outcome in ("finished", "SystemExit: 0"), outcome
    for name in ("--model_name_or_path", "--dataset_path", "--image_root", "--freeze_vision_tower", "--use_lora",
                 "--per_device_train_batch_size", "--overwrite_output_dir"):  # fmt: skip
        assert name in out


# ---- LLaVA-NeXT and OneVision: any-resolution tiling through the same recipe -------------------------------------

# Image shapes that tile differently at the tiny 32-pixel tile: square, wide and tall grids, and unpadding.
ANY_RESOLUTION_SHAPES = [(64, 64), (96, 40), (40, 96), (80, 56)]


def write_any_resolution_data(demo_data, folder, with_videos: bool):
    """The demo's colour and side questions on images of four shapes (so the samples of one micro-batch have
    different numbers of tiles), plus two-image, text-only and, for OneVision, 4-frame video records."""
    from PIL import Image

    records = json.loads((demo_data / "train.json").read_text())[:48]
    (folder / "images").mkdir(parents=True)
    for index, record in enumerate(records):
        name = f"images/{index:03d}.png"
        shape = ANY_RESOLUTION_SHAPES[index % len(ANY_RESOLUTION_SHAPES)]
        Image.open(demo_data / record["image"]).convert("RGB").resize(shape).save(folder / name)
        record["image"] = name
    two = {"image": [records[0]["image"], records[1]["image"]], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat color is the first shape? Answer with one word."},
        {"from": "gpt", "value": records[0]["conversations"][1]["value"]}]}  # fmt: skip
    text = {"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}
    extra = [two, text] * 4
    if with_videos:
        same_shape = range(0, 16, len(ANY_RESOLUTION_SHAPES))  # a video's frames share one size
        video = {"video": [records[k]["image"] for k in same_shape], "conversations": [
            {"from": "human", "value": "<video>\nWhat color is the shape? Answer with one word."},
            {"from": "gpt", "value": records[0]["conversations"][1]["value"]}]}  # fmt: skip
        extra += [video] * 4
    (folder / "train.json").write_text(json.dumps(records + extra))
    return folder / "train.json"


@pytest.mark.gpu_e2e
@pytest.mark.parametrize(
    # OneVision's run covers NeXT's tiling and adds videos: NeXT's is in `make test-extended`.
    "family",
    [pytest.param("llava-next", marks=pytest.mark.extended), "llava-onevision"],
)
def test_any_resolution_llava_trains_under_zero3_and_reloads(tiny_model, demo_data, tmp_path, family):
    """LLaVA-NeXT and OneVision through recipes/llava.py under the shared ZeRO-3 offload config on 2 processes:
    micro-batches mix images of different tile counts (collated with image_sizes), two-image and text-only samples
    (and videos for OneVision); the loss falls, the saved model equals the trained weights, and the projector and
    image_newline trained while the vision tower stayed as loaded."""
    from transformers import AutoModelForImageTextToText

    model_dir, output_dir = tiny_model(family), tmp_path / "out"
    dataset = write_any_resolution_data(demo_data, tmp_path / "data", with_videos=family == "llava-onevision")
    args = [
        "--config", "recipes/configs/llava_demo.yaml", "--model_name_or_path", model_dir,
        "--dataset_path", dataset, "--image_root", tmp_path / "data", "--output_dir", output_dir,
        "--max_steps", "32", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--logging_steps", "4", "--save_strategy", "steps", "--save_steps", "32", "--max_length", "256",
    ]  # fmt: skip
    result = launch_recipe("llava.py", args)
    assert f"preflight: all {len(json.loads(dataset.read_text()))} records" in result.stdout
    losses = logged_losses(output_dir)
    assert losses[32] < 0.6 * losses[4], losses
    changed = assert_saved_equals_trained(AutoModelForImageTextToText, output_dir, "checkpoint-32", model_dir)
    assert "model.image_newline" in changed
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)
    assert any(name.startswith("model.language_model.") for name in changed)
    assert not any(name.startswith("model.vision_tower.") for name in changed)
    assert_planner_counts_what_the_run_trained("llava", args)
