"""scripts/benchmark.py on a CPU (--tiny: the real-size architectures with every dimension small) and the packed
vision attention's fallback. The GPU figures themselves are in docs/benchmarks.md, not in tests."""

import copy
import json
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.conftest import REPO, run_command
from vlm_recipes.attention import VARLEN_ATTENTION, use_packed_vision_attention
from vlm_recipes.known_models import KNOWN_MODELS

sys.path.insert(0, str(REPO / "scripts"))
from benchmark import error_summary, scaling_table, tiny_config  # noqa: E402


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.gpu_e2e, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="the packed kernel runs on CUDA only (make test-gpu)")]),
    ],
)  # fmt: skip
def test_packed_vision_attention_matches_sdpa_window_by_window(device, monkeypatch):
    """On CPU the packed path falls back to windows (fp32, exact); on CUDA, in bf16, the packed kernel itself runs
    (counted) and matches transformers' sdpa path to bf16 rounding, outputs and gradients."""
    config = tiny_config(KNOWN_MODELS["qwen2.5-vl-3b"].config(), "qwen_vl")
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").to(device, dtype)
    packed = copy.deepcopy(model)
    use_packed_vision_attention(packed, packed.config.vision_config)
    assert packed.model.visual.config._attn_implementation == VARLEN_ATTENTION
    assert packed.config.text_config._attn_implementation == "sdpa"
    kernel_calls = []
    if device == "cuda":
        import torch.nn.attention.varlen as varlen

        kernel = varlen.varlen_attn
        monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: kernel_calls.append(1) or kernel(*a, **k))
    # two images, the second with edge windows of other sizes
    grid = torch.tensor([[1, 32, 32], [1, 16, 24]], device=device)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device, dtype=dtype)
    results = []
    for tower in (model.model.visual, packed.model.visual):
        x = pixels.clone().requires_grad_(True)
        out = tower(x, grid_thw=grid).pooler_output
        out.float().square().mean().backward()
        results.append((out.detach().float(), x.grad.float()))
    tolerance = {} if device == "cpu" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(results[0][0], results[1][0], **tolerance)
    torch.testing.assert_close(results[0][1], results[1][1], **tolerance)
    assert bool(kernel_calls) == (device == "cuda")


def test_failed_run_is_summarised_by_its_cause():
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.48 GiB.\nChildFailedError: ..."
    assert error_summary(oom, 1).startswith("torch.OutOfMemoryError: CUDA out of memory")
    # accelerate exits 1 when its worker was SIGKILLed (the OOM killer): the log, not the exit code, says so
    killed = "failed (exitcode: -9) local_rank: 0 (pid: 1992)\n  traceback : Signal 9 (SIGKILL) received by PID 1992"
    assert "killed by SIGKILL" in error_summary(killed, 1)
    assert error_summary("nothing useful", 3) == "exit code 3"
    assert error_summary("", "timeout after 240 s") == "timeout after 240 s"


@pytest.mark.extended  # a launch of the recipe as `make benchmark` runs it on a GPU: in `make test-extended`
def test_benchmark_runs_the_recipe_on_two_processes_and_writes_a_result_line(tmp_path):
    results = tmp_path / "results.jsonl"
    run_command(
        [sys.executable, "scripts/benchmark.py", "run", "--model", "qwen2.5-vl-3b", "--tiny",
         "--configs", "zero3_offload", "--steps", "4", "--micro_batch", "2", "--seq_len", "320",
         "--num_processes", "2", "--dataloader_workers", "0", "--attn_implementation", "sdpa_varlen",
         "--work_dir", tmp_path, "--results", results],
        timeout=600,
    )  # fmt: skip
    (line,) = [json.loads(text) for text in results.read_text().splitlines()]
    assert line["status"] == "ok", line
    assert line["seq_len"] == 320 and line["tokens_per_s"] > 0 and line["median_step_time_s"] > 0
    assert line["tokens_per_s_per_gpu"] == pytest.approx(line["tokens_per_s"] / 2, abs=0.1)
    assert len(line["step_times_s"]) == 4
    assert line["resolved_ds_config"]["zero_optimization"]["stage"] == 3
    assert line["resolved_ds_config"]["train_batch_size"] == 2 * 2  # micro-batch x processes
    assert [p["rank"] for p in line["per_process"]] == [0, 1]
    assert all(p["host_peak_rss_gib"] > 0.1 for p in line["per_process"])
    report = run_command([sys.executable, "scripts/benchmark.py", "report", results]).stdout
    assert "| qwen2.5-vl-3b | full | zero3_offload | sdpa_varlen, on | 2 x 1 x 2 |" in report
    assert "- (no 1-GPU run)" in report  # the scaling table names the missing 1-process run


def test_scaling_table_compares_with_the_last_one_gpu_run_of_the_same_setting(capsys):
    def row(processes, tokens_per_s, micro_batch=4):
        return {
            "status": "ok", "model": "m", "mode": "full", "config": "zero3_offload", "micro_batch": micro_batch,
            "grad_accum": 1, "seq_len": 512, "image_size": 448, "gradient_checkpointing": True,
            "attn_implementation": "sdpa", "recipe_args": "", "num_processes": processes,
            "median_step_time_s": 1.0, "tokens_per_s": tokens_per_s,
            "per_process": [
                {"rank": r, "gpu_peak_allocated_gib": 10.0 + r, "host_peak_rss_gib": 50.0} for r in range(processes)
            ],
        }  # fmt: skip

    # the second 1-GPU run is the baseline; the micro-batch-8 one is another setting
    scaling_table([row(1, 900.0), row(1, 1000.0), row(1, 3000.0, micro_batch=8), row(2, 1800.0)])
    out = capsys.readouterr().out
    assert (
        "| m | full | zero3_offload | 4 x 1 | 2 | 1.00 | 1,800 | 900 | 1,000 | 90% | 10.0 / 11.0 | 50.0 / 50.0 |"
        in out
    )


def test_the_profiled_steps_start_where_asked_and_never_inside_the_warm_up(tmp_path, monkeypatch):
    from vlm_recipes.run_stats import RunStatsCallback

    def profiled_steps(start: str) -> list[int]:
        monkeypatch.setenv("VLM_RECIPES_PROFILE_DIR", str(tmp_path / start))
        monkeypatch.setenv("VLM_RECIPES_PROFILE_START", start)
        callback = RunStatsCallback(warmup_steps=3)
        callback.last = 0.0
        for _ in range(9):
            callback.on_step_begin(None, None, None)
            callback.on_step_end(None, None, None)
        return callback.profiled_steps

    assert profiled_steps("6") == [6, 7]  # a compiled run profiled once its recompiles have settled
    assert profiled_steps("1") == [3, 4]  # never the warm-up's steps
    assert profiled_steps("") == [3, 4]  # unset: right after the warm-up


def test_the_length_mix_reports_sample_tokens_and_padding_for_padded_and_packed_batches(tmp_path):
    results = tmp_path / "results.jsonl"
    run_command(
        [sys.executable, "scripts/benchmark.py", "run", "--model", "qwen2.5-vl-3b", "--tiny", "--length_mix",
         "--batching", "padded,packed", "--configs", "zero3_offload", "--steps", "5", "--micro_batch", "4",
         "--packed_micro_batch", "1", "--seq_len", "768", "--num_processes", "1", "--dataloader_workers", "0",
         "--launch_args=--num_cpu_threads_per_process 2", "--work_dir", tmp_path, "--results", results],
        timeout=900,
    )  # fmt: skip
    padded, packed = [json.loads(text) for text in results.read_text().splitlines()]
    assert padded["status"] == packed["status"] == "ok", (padded, packed)
    assert (padded["batching"], packed["batching"], packed["micro_batch"]) == ("padded", "packed", 1)
    drawn = packed["length_mix_drawn"]
    assert drawn["images_per_sample"]["0"] > 0 and drawn["max_tokens"] <= 768 < 2 * drawn["mean_tokens"] * 4
    # Mixed lengths padded to each batch's longest waste slots; rows packed to 768 tokens waste few.
    assert packed["padding_fraction"] < 0.10 < padded["padding_fraction"], (packed, padded)
    assert packed["tokens_per_s"] == packed["real_tokens_per_s"] > 0
    # --launch_args reach `accelerate launch` itself (it refuses a flag it does not know) and are recorded
    assert (
        "launch --config_file" in packed["command"] and "--num_cpu_threads_per_process 2" in packed["command"]
    )
    assert packed["launch_args"] == "--num_cpu_threads_per_process 2"
    report = run_command([sys.executable, "scripts/benchmark.py", "report", results]).stdout
    assert (
        "| qwen2.5-vl-3b | full | zero3_offload | packed | sdpa, on, num_cpu_threads_per_process 2 | 1 x 1 x 1 |"
        in report
    )
