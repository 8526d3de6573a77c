"""The host-RAM check every recipe runs before any weights load: a DeepSpeed config that offloads to the CPU and
needs more host RAM than this node has stops with the fix, instead of being killed by the kernel part-way.

Thin on purpose: a run without offload, or with `--skip_memory_check true`, returns before the memory planner
(vlm_recipes/memory.py, vlm_recipes/known_models.py) is imported. With offload the planner estimates the run from the
model's config, split into parts by the recipe's ModelParts, and, on a GPU machine, names a faster config that fits.
"""

import json
import os
import sys


def meminfo_available_bytes() -> float | None:
    """MemAvailable of /proc/meminfo: what the kernel can hand out without swapping or killing."""
    from vlm_recipes.run_stats import read_proc_kib

    kib = read_proc_kib("/proc/meminfo", "MemAvailable")
    return kib * 1024 if kib is not None else None


def host_need(run_estimate, hardware) -> float:
    """Bytes of host RAM a run needs on each node; on a CPU-only run the "GPU" share is host memory too."""
    on_cpu = hardware.gpus_per_node * run_estimate.gpu_bytes if hardware.device == "cpu" else 0
    return run_estimate.host_bytes + on_cpu


def records_footprint(record_sets) -> tuple[int, int]:
    """(how many records, bytes of their distinct memory-mapped Arrow files) of the run's record sets."""
    files = {
        entry["filename"]
        for records in record_sets
        for entry in getattr(getattr(records, "table", None), "cache_files", [])
    }
    return sum(len(records) for records in record_sets), sum(os.path.getsize(f) for f in files)


def check_host_memory(
    training_args,
    model_args,
    data_args,
    image_tokens: int | None = None,
    model_config: tuple | None = None,
    records=(),
    parts=None,
) -> None:
    """Refuse, before any weights load, a DeepSpeed offload config whose host-RAM need on this node exceeds
    MemAvailable. `--skip_memory_check true` skips it. `image_tokens`: per sample, as the run's processor makes them
    (masking.image_tokens_at_cap); None: the config's default. `model_config`: (display name, transformers config)
    for a model the recipe assembles itself. `records`: the run's record sets (data.read_records; None is skipped),
    counted with the model states: each process's share and the mapped records table. `parts`: the recipe's
    ModelParts, which say which parameters are the vision tower, the projector and the language model."""
    from dataclasses import replace

    from vlm_recipes.config import ConfigError
    from vlm_recipes.ds_config import ds_config_in_use, offloads

    ds_path = ds_config_in_use(training_args)
    if ds_path is None or getattr(training_args, "skip_memory_check", False):
        return
    if not any(offloads(json.loads(ds_path.read_text())).values()):
        return
    available = meminfo_available_bytes()
    if available is None:
        return
    from vlm_recipes import memory as planner

    shape, setup = planner.planned_run(
        model_args, data_args, training_args, image_tokens, model_config, parts
    )
    count, table_bytes = records_footprint([r for r in records if r is not None])
    setup = replace(setup, records=count, records_table_bytes=table_bytes)
    hardware = planner.hardware_from_environment(training_args)
    run_estimate = planner.host_estimate_for_run(ds_path, shape, setup, hardware)
    need = host_need(run_estimate, hardware)
    if need <= available:
        line = planner.faster_config_line(ds_path, shape, setup, hardware)
        if line and os.environ.get("RANK", "0") == "0":
            print(line, file=sys.stderr, flush=True)
        return
    data = run_estimate.host.get(planner.RECORDS, 0) + run_estimate.host.get(planner.RECORDS_TABLE, 0)
    gib = planner.GIB
    raise ConfigError(
        f"{ds_path} needs about {need / gib:.1f} GiB of host RAM on this node (the memory planner's estimate for "
        f"{hardware.gpus_per_node} process(es) per node, {setup.mode}, {shape.total_params / 1e9:.2f}B parameters, "
        f"{count:,} records: {data / gib:.1f} GiB of it), "
        f"but only {available / gib:.1f} GiB is available: the kernel would kill the run part-way. Fixes: train "
        "fewer parameters (--use_lora true, or freeze more: only trainable ones carry optimizer state); more "
        "nodes (ZeRO-3 divides the offloaded states among them); ds_configs/zero3.json if the GPUs can hold the "
        "states; a machine with more RAM. To compare every config for your GPUs: python scripts/plan_memory.py "
        f"--model {model_args.model_name_or_path or '<a folder with the assembled config.json>'} "
        f"--gpus {hardware.gpus_per_node} --nodes {hardware.nodes} --host_ram_gib {available / gib:.0f}. "
        "--skip_memory_check true runs anyway."
    )
