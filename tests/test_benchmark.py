"""scripts/benchmark.py on a CPU (--tiny: the real-size architectures with every dimension small) and the packed
vision attention's fallback. The GPU figures themselves are in docs/benchmarks.md, not in tests."""

import copy
import json
import sys

import torch
from transformers import AutoModelForImageTextToText

from tests.conftest import REPO, run_command
from vlm_recipes.attention import VARLEN_ATTENTION, use_packed_vision_attention
from vlm_recipes.known_models import KNOWN_MODELS

sys.path.insert(0, str(REPO / "scripts"))
from benchmark import error_summary, tiny_config  # noqa: E402


def test_packed_vision_attention_matches_sdpa_window_by_window():
    """On CPU the packed path falls back to windows; outputs and gradients equal transformers' sdpa path."""
    config = tiny_config(KNOWN_MODELS["qwen2.5-vl-3b"].config(), "qwen_vl")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    packed = copy.deepcopy(model)
    use_packed_vision_attention(packed, packed.config.vision_config)
    assert packed.model.visual.config._attn_implementation == VARLEN_ATTENTION
    assert packed.config.text_config._attn_implementation == "sdpa"
    grid = torch.tensor([[1, 32, 32], [1, 16, 24]])  # two images, the second with edge windows of other sizes
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    results = []
    for tower in (model.model.visual, packed.model.visual):
        x = pixels.clone().requires_grad_(True)
        out = tower(x, grid_thw=grid).pooler_output
        out.square().mean().backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_failed_run_is_summarised_by_its_cause():
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.48 GiB.\nChildFailedError: ..."
    assert error_summary(oom, 1).startswith("torch.OutOfMemoryError: CUDA out of memory")
    # accelerate exits 1 when its worker was SIGKILLed (the OOM killer): the log, not the exit code, says so
    killed = "failed (exitcode: -9) local_rank: 0 (pid: 1992)\n  traceback : Signal 9 (SIGKILL) received by PID 1992"
    assert "killed by SIGKILL" in error_summary(killed, 1)
    assert error_summary("nothing useful", 3) == "exit code 3"
    assert error_summary("", "timeout after 240 s") == "timeout after 240 s"


def test_benchmark_runs_the_recipe_and_writes_a_result_line(tmp_path):
    results = tmp_path / "results.jsonl"
    run_command(
        [sys.executable, "scripts/benchmark.py", "run", "--model", "qwen2.5-vl-3b", "--tiny",
         "--configs", "zero3_offload", "--steps", "4", "--micro_batch", "2", "--seq_len", "320",
         "--dataloader_workers", "0", "--attn_implementation", "sdpa_varlen", "--work_dir", tmp_path,
         "--results", results],
        timeout=600,
    )  # fmt: skip
    (line,) = [json.loads(text) for text in results.read_text().splitlines()]
    assert line["status"] == "ok", line
    assert line["seq_len"] == 320 and line["tokens_per_s"] > 0 and line["median_step_time_s"] > 0
    assert len(line["step_times_s"]) == 4
    assert line["resolved_ds_config"]["zero_optimization"]["stage"] == 3
    assert line["host_peak_rss_gib_per_process"] > 0.1
    report = run_command([sys.executable, "scripts/benchmark.py", "report", results]).stdout
    assert "| qwen2.5-vl-3b | full | zero3_offload | sdpa_varlen, on | 2 x 1 x 1 |" in report
