r"""What the data path costs at real scale: synthetic LLaVA-format datasets (five-turn conversations, one image each,
images repeating) read the way the recipes read them, each measurement in a fresh process.

    python scripts/benchmark_data.py --records 100000                 # writes runs/data-bench/records-100000
    python scripts/benchmark_data.py --records 665000 --modes cold warm

Modes:
    dicts   the records as Python dicts (json.load, every record normalized and kept): how the recipes held them
            before the records cache
    cold    vlm_recipes.data.read_records with an empty records cache: parse, write the Arrow file, map it
    warm    read_records again: the cached Arrow file, memory-mapped; only the image paths are checked
    preflight-cold, preflight-warm
            the preflight of those records with --processor's files (default: llava-1.5-7b-hf's, from
            ../shared/real-checkpoints) at max_length 2048, one process, no workers: without its cache, then with it
Each row gives the wall time and the process's memory after loading (and, in brackets, its RSS before loading,
with torch-free imports of datasets and pyarrow done): RSS, and of it the private part (what this process alone
holds: each rank pays it again) and the shared part (libraries and the mapped Arrow file in the page cache: one
copy for every rank on the machine). Prints a markdown table and appends one JSON line per
row to <output_dir>/results.jsonl.
"""

import argparse
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
        "peak_rss_mib": int(peak.split()[1]) / 1024,
    }


def measure(mode: str, path: Path) -> dict:
    """Run in a fresh process: load the records the `mode` way, then report time and memory."""
    import gc

    import datasets  # noqa: F401 - imported before the baseline in every mode, as a recipe has it imported
    import pyarrow  # noqa: F401

    from vlm_recipes.data import normalize_record, read_records

    gc.collect()
    baseline = memory_kib()
    start = time.perf_counter()
    if mode == "dicts":
        records = [normalize_record(raw) for raw in json.loads(path.read_text())]
    elif mode.startswith("preflight"):
        return measure_preflight(mode, path)
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
    }  # fmt: skip


def measure_preflight(mode: str, path: Path) -> dict:
    """The preflight of the (cached) records with the processor in $BENCHMARK_PROCESSOR, at max_length 2048, in one
    process without workers: records checked per second, and the seconds it took."""
    from transformers import AutoProcessor

    from vlm_recipes.data import ConversationDataset, read_records
    from vlm_recipes.preflight import preflight

    records, _ = read_records(str(path), str(path.parent))
    dataset = ConversationDataset(
        records, AutoProcessor.from_pretrained(os.environ["BENCHMARK_PROCESSOR"]), 2048
    )
    lines = []
    start = time.perf_counter()
    preflight(dataset, str(path), log=lines.append)
    seconds = time.perf_counter() - start
    return {"mode": mode, "records": len(records), "seconds": round(seconds, 2),
            "records_per_s": round(len(records) / seconds, 1), "report": lines[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--output_dir", type=Path, default=REPO / "runs" / "data-bench")
    modes = ["dicts", "cold", "warm", "preflight-cold", "preflight-warm"]
    parser.add_argument("--modes", nargs="+", default=["dicts", "cold", "warm"], choices=modes)
    parser.add_argument("--processor", type=Path, default=REPO.parent / "shared" / "real-checkpoints" / "llava-1.5-7b-hf",
                        help="for the preflight modes: the processor files to check the records with")  # fmt: skip
    parser.add_argument("--measure", choices=modes, help=argparse.SUPPRESS)  # the child
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dataset)))
        return

    folder = args.output_dir / f"records-{args.records}"
    path = make_dataset(folder, args.records)
    cache = folder / "records-cache"
    rows = []
    for mode in args.modes:
        if mode == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        if mode == "preflight-cold":
            shutil.rmtree(cache / "preflight", ignore_errors=True)
        env = {**os.environ, "VLM_RECIPES_CACHE": str(cache), "PYTHONPATH": str(REPO),
               "BENCHMARK_PROCESSOR": str(args.processor), "HF_HUB_OFFLINE": "1"}  # fmt: skip
        command = [sys.executable, __file__, "--measure", mode, "--dataset", str(path)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        row = {
            **json.loads(result.stdout.strip().splitlines()[-1]),
            "json_mib": round(path.stat().st_size / 2**20),
        }
        rows.append(row)
        with (args.output_dir / "results.jsonl").open("a") as out:
            out.write(json.dumps({**row, "command": " ".join(sys.argv)}) + "\n")
    print("| records | mode | load s | RSS MiB (before loading) | private MiB | shared MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row["mode"].startswith("preflight"):
            print(
                f"| {row['records']:,} | {row['mode']} | {row['seconds']} ({row['records_per_s']} records/s) | | | | |"
            )
            continue
        print(f"| {row['records']:,} | {row['mode']} | {row['seconds']} | {row['rss_mib']:.0f} "
              f"({row['baseline_rss_mib']:.0f}) | {row['private_mib']:.0f} | {row['shared_file_mib']:.0f} | "
              f"{row['peak_rss_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
