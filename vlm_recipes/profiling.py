"""The PyTorch profiler over a few training steps, for scripts/benchmark.py --profile: RunStatsCallback imports this
module only when VLM_RECIPES_PROFILE_DIR is set, so a plain run never loads it."""

from pathlib import Path

import torch


class StepProfiler:
    """Records CPU (and CUDA, where present) ops between start() and stop(); write() saves the op tables, sorted by
    self CUDA time, self CPU time and total CPU time, outside the timed steps."""

    def __init__(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile = torch.profiler.profile(activities=activities, record_shapes=False)

    def start(self) -> None:
        self.profile.__enter__()

    def stop(self) -> None:
        self.profile.__exit__(None, None, None)

    def write(self, folder: Path, rank: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        averages = self.profile.key_averages()
        for sort_by in ("self_cuda_time_total", "self_cpu_time_total", "cpu_time_total"):
            try:
                table = averages.table(sort_by=sort_by, row_limit=45, max_name_column_width=70)
            except (AttributeError, KeyError, RuntimeError):  # no CUDA events on a CPU run
                continue
            (folder / f"rank{rank}_{sort_by}.txt").write_text(table)
