"""What a run cost: wall time per optimizer step, GPU memory peaks and host memory peaks, for every rank.

Every recipe adds `RunStatsCallback`. At the end of training each rank writes output_dir/run_stats/rank<N>.json
(steps run in this launch, step times, sample tokens and padded slots per step, memory peaks, how many parameter elements the model has, how many it
trains, and how many the rank owns: its shard under ZeRO-3 and FSDP2) and rank 0 prints one summary line. scripts/benchmark.py reads these files, and the memory
planner's tests compare its estimates against them, so a benchmark row and a user's run are measured by the same
code.
"""

import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

RUN_STATS_DIR = "run_stats"
GIB = 1024**3
PROFILED_STEPS = 2


def read_proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class HostMemorySampler(threading.Thread):
    """Peak host memory in use on the whole machine (MemTotal - MemAvailable), sampled every `interval` s.

    A process's own peak RSS (VmHWM) misses what its data-loader workers and the other ranks hold, and pinned
    buffers, which is what the kernel's out-of-memory killer counts; the machine-wide figure does not.
    """

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kib = 0
        self.stopped = threading.Event()

    def used_kib(self) -> int:
        total = read_proc_kib("/proc/meminfo", "MemTotal") or 0
        available = read_proc_kib("/proc/meminfo", "MemAvailable") or total
        return total - available

    def run(self):
        while not self.stopped.is_set():
            self.peak_kib = max(self.peak_kib, self.used_kib())
            self.stopped.wait(self.interval)

    def stop(self) -> int:
        self.stopped.set()
        self.peak_kib = max(self.peak_kib, self.used_kib())
        return self.peak_kib


def parameter_elements(model: torch.nn.Module) -> tuple[int, int, int]:
    """(elements of the parameters this rank owns, elements of the whole model, of those the trainable ones).
    Under ZeRO-3 a rank owns its partition (ds_tensor), under FSDP2 its shard of each DTensor; otherwise every
    parameter, whole. The trainable count is what the run really trains, whatever froze or adapted it."""
    owned = total = trainable = 0
    for parameter in model.parameters():
        if hasattr(parameter, "ds_tensor"):  # ZeRO-3: the full tensor is gathered only around its use
            mine, whole = parameter.ds_tensor.numel(), parameter.ds_numel
        elif hasattr(parameter, "to_local"):  # FSDP2: a DTensor sharded across the ranks
            mine, whole = parameter.to_local().numel(), parameter.numel()
        else:
            mine = whole = parameter.numel()
        owned, total = owned + mine, total + whole
        trainable += whole if parameter.requires_grad else 0
    return owned, total, trainable


class RunStatsCallback(TrainerCallback):
    """Records the wall time of every optimizer step (CUDA synchronised, so a step's GPU work is inside it),
    the peak GPU memory allocated and reserved, this process's peak RSS and the machine's peak memory in use."""

    def __init__(self, warmup_steps: int = 3):
        self.warmup_steps = warmup_steps
        self.step_times: list[float] = []
        self.train_begin_unix = self.first_step_end_unix = None
        self.sampler: HostMemorySampler | None = None
        self.last: float | None = None
        self.baseline_used_kib = 0
        self.profiler = None
        self.profiled_steps: list[int] = []
        self.parameters_owned = self.parameters_total = self.parameters_trainable = 0
        # Filled by RecipeTrainer as it sees each micro-batch: sample tokens and slots (rows x length) so far.
        self.token_counts: dict | None = None
        self.counted = {"real": 0, "slots": 0}
        self.real_tokens_per_step: list[int] = []
        self.slots_per_step: list[int] = []

    def synchronize(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        self.sampler = HostMemorySampler()
        self.baseline_used_kib = self.sampler.used_kib()
        self.sampler.start()
        self.synchronize()
        self.last = time.perf_counter()
        self.train_begin_unix = (
            time.time()
        )  # wall clock, for the time from launch to training (benchmark_data.py)

    def on_step_begin(self, args, state, control, **kwargs):
        # VLM_RECIPES_PROFILE_DIR=<folder>: the PyTorch profiler over two steps after the warm-up (or after
        # VLM_RECIPES_PROFILE_START steps: a compiled run's recompiles settle later), its op tables written there
        # (scripts/benchmark.py --profile [--profile_start N] sets them).
        folder = os.environ.get("VLM_RECIPES_PROFILE_DIR")
        if folder and len(self.step_times) == self.profile_start() and self.profiler is None:
            from vlm_recipes.profiling import StepProfiler

            self.profiler = StepProfiler()
            self.profiler.start()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.synchronize()
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        self.last = now
        if self.token_counts is not None:  # this step's share of the counts (its micro-batches on this rank)
            self.real_tokens_per_step.append(self.token_counts["real"] - self.counted["real"])
            self.slots_per_step.append(self.token_counts["slots"] - self.counted["slots"])
            self.counted = dict(self.token_counts)
        if len(self.step_times) == 1:
            self.first_step_end_unix = time.time()
        if len(self.step_times) == 1 and model is not None:
            # After a step the model is the one DeepSpeed or FSDP2 runs (the Trainer hands it to FSDP2 only after
            # on_train_begin): what this rank holds of it.
            self.parameters_owned, self.parameters_total, self.parameters_trainable = parameter_elements(
                model
            )
        if self.profiler and len(self.step_times) == self.profile_start() + PROFILED_STEPS:
            self.profiler.stop()  # its tables are written at the end, outside the timing
            self.profiled_steps = list(range(self.profile_start(), self.profile_start() + PROFILED_STEPS))

    def profile_start(self) -> int:
        return max(int(os.environ.get("VLM_RECIPES_PROFILE_START") or self.warmup_steps), self.warmup_steps)

    def steady_step_times(self) -> list[float]:
        """Step times after the warm-up, without the steps the profiler slowed down."""
        return [
            t
            for k, t in enumerate(self.step_times)
            if k >= self.warmup_steps and k not in self.profiled_steps
        ]

    def stats(self, args, state) -> dict:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        machine_peak_kib = self.sampler.stop() if self.sampler else 0
        return {
            "rank": args.process_index,
            "world_size": args.world_size,
            "steps": len(self.step_times),
            "parameter_elements_owned": self.parameters_owned,
            "parameter_elements_total": self.parameters_total,
            "parameter_elements_trainable": self.parameters_trainable,
            "step_times_s": [round(t, 4) for t in self.step_times],
            "real_tokens_per_step": self.real_tokens_per_step,  # this rank's sample tokens, padding left out
            "slots_per_step": self.slots_per_step,  # this rank's rows x length: what the model computed on
            "train_begin_unix": self.train_begin_unix,
            "first_step_end_unix": self.first_step_end_unix,
            "median_step_time_s": statistics.median(self.steady_step_times() or self.step_times or [0.0]),
            "warmup_steps_excluded": self.warmup_steps,
            "profiled_steps_excluded": self.profiled_steps,
            "num_input_tokens_seen": state.num_input_tokens_seen or None,
            "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
            "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
            "gpu_name": torch.cuda.get_device_name() if cuda else None,
            "process_peak_rss_gib": (read_proc_kib("/proc/self/status", "VmHWM") or 0) / 2**20,
            "machine_peak_used_gib": machine_peak_kib / 2**20,
            "machine_used_before_training_gib": self.baseline_used_kib / 2**20,
            "machine_total_gib": (read_proc_kib("/proc/meminfo", "MemTotal") or 0) / 2**20,
        }

    def on_train_end(self, args, state, control, **kwargs):
        stats = self.stats(args, state)
        if self.profiled_steps:
            self.profiler.write(Path(os.environ["VLM_RECIPES_PROFILE_DIR"]), args.process_index)
        folder = Path(args.output_dir, RUN_STATS_DIR)
        os.makedirs(folder, exist_ok=True)
        (folder / f"rank{args.process_index}.json").write_text(json.dumps(stats, indent=1) + "\n")
        if state.is_world_process_zero:
            median = stats["median_step_time_s"]
            gpu = stats["gpu_peak_allocated_gib"]
            print(
                f"run stats: {stats['steps']} steps, median step {median:.3f} s"
                if median is not None
                else f"run stats: {stats['steps']} steps",
                f"| peak GPU allocated {gpu:.1f} GiB" if gpu is not None else "| no GPU",
                f"| peak RSS {stats['process_peak_rss_gib']:.1f} GiB (this rank)",
                f"| machine peak in use {stats['machine_peak_used_gib']:.1f} GiB",
                f"-> {folder}",
                flush=True,
            )


def read_run_stats(output_dir: str | Path) -> list[dict]:
    """Every rank's stats of a finished run, rank 0 first."""
    files = sorted(Path(output_dir, RUN_STATS_DIR).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(p.read_text()) for p in files]
