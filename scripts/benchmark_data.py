r"""What the data path costs at real scale: synthetic LLaVA-format datasets (five-turn conversations, one image each,
images repeating) read the way the recipes read them, each measurement in a fresh process.

    python scripts/benchmark_data.py --records 100000                 # writes runs/data-bench/records-100000
    python scripts/benchmark_data.py --records 665000 --modes cold warm
    python scripts/benchmark_data.py --format datasets --records 10000    # a `datasets` folder, images embedded

--format json (default): one LLaVA-format JSON list, images as files. --format datasets: the same records in the
chat format saved as a `datasets` folder (save_to_disk) with every image's bytes embedded in its row (256x256
noise JPEGs, about 190 KB each, as incompressible as photographs), as datasets from the Hub are.

Modes:
    dicts   the records as Python dicts (json.load, or every row of the `datasets` table read with its image
            bytes, every record normalized and kept): how the recipes held them before the records cache
    cold    vlm_recipes.data.read_records with an empty records cache: parse, write the Arrow file, map it
    warm    read_records again: the cached Arrow file, memory-mapped; only the image paths are checked
    preflight-cold, preflight-warm
            the preflight of those records with --processor's files (default: llava-1.5-7b-hf's, from
            ../shared/real-checkpoints) at max_length 2048, one process, no workers: without its cache, then with it
    workers
            what each data-loader worker costs: the records (warm) through ConversationDataset with --processor's
            files and the recipes' collator, 4 samples a batch, --workers workers (default 4) for 100 batches; each
            worker's private dirty memory (its own, not shared with the parent) and its RSS
    first-step-cold, first-step-warm
            the real launch, `accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes
            --processes recipes/llava.py` with a tiny random LLaVA (scripts/make_tiny_model.py --family llava) on these
            records for one step, --workers data-loader workers per process: the seconds from the launch to the end
            of the first training step with empty caches (records and preflight), then on a re-run with them
Each row gives the wall time and the process's memory after loading (and, in brackets, its RSS before loading,
with torch-free imports of datasets and pyarrow done): RSS; of it the anonymous part (the process's own heap, which
each rank pays again and the kernel cannot reclaim), the private part (the heap, plus pages of a mapped file only
this process has read: reclaimable page cache) and the shared part (libraries and the mapped Arrow file in the page
cache: one copy for every rank on the machine). Prints a markdown table and appends one JSON line per
row to <output_dir>/results.jsonl.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is in the picture?", "What color is it?", "Where is it?", "How many are there?", "Why?"]


def make_dataset(folder: Path, records: int, images: int = 200) -> Path:
    """A LLaVA-format JSON list of `records` five-turn conversations over `images` distinct images."""
    from PIL import Image

    path = folder / "train.json"
    if path.is_file():
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(images):
        Image.new("RGB", (64, 64), (k % 256, 80, 160)).save(folder / "images" / f"{k:05d}.png")
    partial = path.with_suffix(".json.partial")  # renamed when complete: an interrupted run is not reused
    with partial.open("w") as out:
        out.write("[\n")
        for k in range(records):
            turns = []
            for turn, question in enumerate(QUESTIONS):
                turns.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
                turns.append({"from": "gpt", "value": f"Answer {turn} of record {k}: " + "a few words " * 8})
            record = {"id": f"{k:07d}", "image": f"images/{k % images:05d}.png", "conversations": turns}
            out.write(json.dumps(record) + (",\n" if k < records - 1 else "\n"))
        out.write("]\n")
    partial.replace(path)
    return path


def make_datasets_folder(folder: Path, records: int, images: int = 20) -> Path:
    """The records of make_dataset in the chat format, as a `datasets` folder with each image embedded."""
    import datasets
    import numpy as np
    from PIL import Image

    path = folder / "train-datasets"
    if (path / "dataset_info.json").is_file():
        return path
    rng, encoded = np.random.default_rng(0), []
    for _ in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())

    def rows():
        for k in range(records):
            messages = []
            for turn, question in enumerate(QUESTIONS):
                media = [{"type": "image", "text": None}] if turn == 0 else []
                messages.append({"role": "user", "content": [*media, {"type": "text", "text": question}]})
                answer = f"Answer {turn} of record {k}: " + "a few words " * 8
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            yield {
                "id": f"{k:07d}",
                "messages": messages,
                "images": [{"bytes": encoded[k % images], "path": None}],
            }

    built = datasets.Dataset.from_generator(rows, cache_dir=str(folder / "generator-cache"))
    built = built.cast_column("images", datasets.Sequence(datasets.Image()))
    built.save_to_disk(str(path.with_suffix(".partial")))
    path.with_suffix(".partial").rename(path)  # complete: an interrupted run is not reused
    shutil.rmtree(folder / "generator-cache", ignore_errors=True)
    return path


def memory_kib() -> dict:
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        rollup[key.rstrip(":")] = int(value)
    peak = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")
    )
    return {
        "rss_mib": rollup["Rss"] / 1024,
        "private_mib": (rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024,
        "shared_file_mib": (rollup["Shared_Clean"] + rollup["Shared_Dirty"]) / 1024,
        # The process's own heap: what it cannot give back. Pages of a mapped file it alone has read count as
        # private too, but the kernel reclaims them (page cache) when memory runs short.
        "anonymous_mib": rollup["Anonymous"] / 1024,
        "peak_rss_mib": int(peak.split()[1]) / 1024,
    }


def measure(mode: str, path: Path) -> dict:
    """Run in a fresh process: load the records the `mode` way, then report time and memory."""
    import gc

    import datasets  # noqa: F401 - imported before the baseline in every mode, as a recipe has it imported
    import pyarrow  # noqa: F401

    from vlm_recipes.data import normalize_record, open_hf_dataset, read_records

    gc.collect()
    baseline = memory_kib()
    start = time.perf_counter()
    if mode == "dicts" and path.is_dir():
        records = [normalize_record(dict(row)) for row in open_hf_dataset(str(path), "train")]
    elif mode == "dicts":
        records = [normalize_record(raw) for raw in json.loads(path.read_text())]
    elif mode.startswith("preflight"):
        return measure_preflight(mode, path)
    elif mode == "workers":
        return measure_workers(path, int(os.environ["BENCHMARK_WORKERS"]))
    else:
        records, problems = read_records(str(path), str(path.parent))
        assert not problems, problems[:3]
    seconds = time.perf_counter() - start
    gc.collect()
    after = memory_kib()
    return {
        "mode": mode, "records": len(records), "seconds": round(seconds, 2),
        **{key: round(value, 1) for key, value in after.items()},
        "baseline_rss_mib": round(baseline["rss_mib"], 1),  # the interpreter and libraries, before loading
        "baseline_anonymous_mib": round(baseline["anonymous_mib"], 1),
    }  # fmt: skip


def measure_preflight(mode: str, path: Path) -> dict:
    """The preflight of the (cached) records with the processor in $BENCHMARK_PROCESSOR, at max_length 2048, in one
    process without workers: records checked per second, the seconds it took, and the heap its results then hold
    (anonymous memory added, measured after the records were read and the processor loaded)."""
    import gc

    from transformers import AutoProcessor

    from vlm_recipes.data import ConversationDataset, read_records
    from vlm_recipes.preflight import preflight

    records, _ = read_records(str(path), str(path.parent))
    dataset = ConversationDataset(
        records, AutoProcessor.from_pretrained(os.environ["BENCHMARK_PROCESSOR"]), 2048
    )
    lines = []
    gc.collect()
    baseline = memory_kib()  # records read, processor loaded: what the preflight's results add is measured
    start = time.perf_counter()
    preflight(dataset, str(path), log=lines.append)
    seconds = time.perf_counter() - start
    gc.collect()
    held = memory_kib()["anonymous_mib"] - baseline["anonymous_mib"]
    return {"mode": mode, "records": len(records), "seconds": round(seconds, 2),
            "records_per_s": round(len(records) / seconds, 1), "report": lines[0],
            "anonymous_added_mib": round(held, 1), "peak_rss_mib": round(memory_kib()["peak_rss_mib"], 1),
            "baseline_rss_mib": round(baseline["rss_mib"], 1)}  # fmt: skip


def measure_workers(path: Path, workers: int, batches: int = 100) -> dict:
    import multiprocessing

    from torch.utils.data import DataLoader
    from transformers import AutoProcessor

    from vlm_recipes.collator import ConversationCollator
    from vlm_recipes.data import ConversationDataset, read_records

    records, _ = read_records(str(path), str(path.parent))
    processor = AutoProcessor.from_pretrained(os.environ["BENCHMARK_PROCESSOR"])
    loader = DataLoader(ConversationDataset(records, processor, 2048), batch_size=4, num_workers=workers,
                        collate_fn=ConversationCollator(processor), shuffle=True)  # fmt: skip
    start, per_worker, batches = time.perf_counter(), [], min(batches, len(loader))
    for k, _ in enumerate(loader):
        if k == batches - 1:  # the workers still alive, each having made its share of the batches
            for child in multiprocessing.active_children():
                rollup = {}
                for line in Path(f"/proc/{child.pid}/smaps_rollup").read_text().splitlines()[1:]:
                    key, value, *_ = line.split()
                    rollup[key.rstrip(":")] = int(value) / 1024
                per_worker.append({"private_dirty_mib": rollup["Private_Dirty"], "rss_mib": rollup["Rss"]})
            break
    dirty = [w["private_dirty_mib"] for w in per_worker]
    return {"mode": "workers", "records": len(records), "workers": len(per_worker), "batches": batches,
            "seconds": round(time.perf_counter() - start, 2), "worker_private_dirty_mib_max": round(max(dirty), 1),
            "worker_private_dirty_mib_mean": round(sum(dirty) / len(dirty), 1),
            "worker_rss_mib_max": round(max(w["rss_mib"] for w in per_worker), 1)}  # fmt: skip


def first_step(mode: str, path: Path, args, cache: Path) -> dict:
    """Launch the recipe for one step; the seconds from the launch to training and to the first step's end."""
    from vlm_recipes.run_stats import read_run_stats

    model = args.output_dir / "tiny-llava"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), "--family", "llava",
                        "--output_dir", str(model)], check=True, capture_output=True)  # fmt: skip
    if mode == "first-step-cold":
        shutil.rmtree(cache, ignore_errors=True)
    run = args.output_dir / "first-step-run"
    shutil.rmtree(run, ignore_errors=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "accelerate_configs" / "zero3_offload.yaml"), "--num_processes", str(args.processes),
        str(REPO / "recipes" / "llava.py"), "--config", str(REPO / "recipes" / "configs" / "llava_demo.yaml"),
        "--model_name_or_path", str(model), "--dataset_path", str(path), "--image_root", str(path.parent),
        "--max_length", "2048", "--max_steps", "1", "--output_dir", str(run),
        "--dataloader_num_workers", str(args.workers or 0),
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLM_RECIPES_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    start = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    stats = read_run_stats(run)[0]
    return {
        "mode": mode, "records": args.records, "processes": args.processes, "workers": args.workers or 0,
        "seconds_to_training": round(stats["train_begin_unix"] - start, 1),
        "seconds_to_first_step_end": round(stats["first_step_end_unix"] - start, 1),
        "process_peak_rss_gib": round(stats["process_peak_rss_gib"], 2),
        "preflight": [line for line in result.stdout.splitlines() if line.startswith("preflight:")],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--output_dir", type=Path, default=REPO / "runs" / "data-bench")
    parser.add_argument("--format", choices=["json", "datasets"], default="json")
    modes = ["dicts", "cold", "warm", "preflight-cold", "preflight-warm", "workers"]
    modes += ["first-step-cold", "first-step-warm"]
    parser.add_argument("--modes", nargs="+", default=["dicts", "cold", "warm"], choices=modes)
    parser.add_argument("--processor", type=Path, default=REPO.parent / "shared" / "real-checkpoints" / "llava-1.5-7b-hf",
                        help="for the preflight and workers modes: the processor files to check the records with")  # fmt: skip
    parser.add_argument("--processes", type=int, default=2, help="for the first-step modes")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers (per process): 0 for the first-step modes, 4 for workers")  # fmt: skip
    parser.add_argument("--measure", choices=modes, help=argparse.SUPPRESS)  # the child
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dataset)))
        return

    folder = args.output_dir / f"records-{args.records}"
    path = make_dataset(folder, args.records)
    if args.format == "datasets":
        path = make_datasets_folder(folder, args.records)
    cache = folder / "records-cache"
    rows = []
    for mode in args.modes:
        if mode == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        if mode == "preflight-cold":
            shutil.rmtree(cache / "preflight", ignore_errors=True)
        env = {**os.environ, "VLM_RECIPES_CACHE": str(cache),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "BENCHMARK_PROCESSOR": str(args.processor), "HF_HUB_OFFLINE": "1",
               "BENCHMARK_WORKERS": str(4 if args.workers is None else args.workers)}  # fmt: skip
        if mode.startswith("first-step"):
            measured = first_step(mode, path, args, cache)
        else:
            command = [sys.executable, __file__, "--measure", mode, "--dataset", str(path)]
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
            measured = json.loads(result.stdout.strip().splitlines()[-1])
        on_disk = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
        row = {
            **measured,
            "format": args.format,
            "dataset_mib": round(on_disk / 2**20),
        }
        rows.append(row)
        with (args.output_dir / "results.jsonl").open("a") as out:
            out.write(json.dumps({**row, "command": " ".join(sys.argv)}) + "\n")
    print(
        "| records | mode | load s | RSS MiB (before loading) | anonymous MiB | private MiB | shared MiB | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["mode"] == "workers":
            print(f"| {row['records']:,} | workers | {row['batches']} batches in {row['seconds']} s | each of "
                  f"{row['workers']} workers: RSS up to {row['worker_rss_mib_max']:.0f}, private dirty "
                  f"{row['worker_private_dirty_mib_mean']:.0f} (max {row['worker_private_dirty_mib_max']:.0f}) "
                  "| | | | | |")  # fmt: skip
            continue
        if row["mode"].startswith("first-step"):
            print(f"| {row['records']:,} | {row['mode']} | launch to first step {row['seconds_to_first_step_end']} "
                  f"s (to training {row['seconds_to_training']} s), {row['processes']} processes x "
                  f"{row['workers']} workers | | | | | |")  # fmt: skip
            continue
        if row["mode"].startswith("preflight"):
            print(f"| {row['records']:,} | {row['mode']} | {row['seconds']} ({row['records_per_s']} records/s) | "
                  f"| {row['anonymous_added_mib']:.0f} added | | | {row['peak_rss_mib']:.0f} |")  # fmt: skip
            continue
        print(f"| {row['records']:,} | {row['mode']} | {row['seconds']} | {row['rss_mib']:.0f} "
              f"({row['baseline_rss_mib']:.0f}) | {row['anonymous_mib']:.0f} | {row['private_mib']:.0f} | "
              f"{row['shared_file_mib']:.0f} | "
              f"{row['peak_rss_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
