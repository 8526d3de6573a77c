"""Benchmark a recipe on a real-size model: random weights, synthetic data, the recipe's own collator and Trainer.

    # one H100: the seed's config and ours, Qwen2.5-VL-3B, 4 x 512 tokens with one 448x448 image each
    python scripts/benchmark.py run --model qwen2.5-vl-3b --configs seed,zero3_offload,zero2_offload,single_gpu
    python scripts/benchmark.py run --model qwen2.5-vl-7b --mode lora --configs zero3_offload_optimizer
    python scripts/benchmark.py report docs/benchmarks/results.jsonl --plot docs/benchmarks/tokens_per_s.png

`run` builds the model at its published size from vlm_recipes/known_models.py (nothing is downloaded; the
processor is built from local parts, as scripts/make_tiny_model.py does), saves it once under --work_dir, writes
a synthetic dataset whose every sample is exactly --seq_len tokens long (image tokens included) with one image,
then for each config launches the real recipe with `accelerate launch` and the config's accelerate YAML, with
`--save_final_model false`. Each run appends one JSON line to --results: median step time after warm-up,
tokens/s, samples/s, MFU (6 x parameters x tokens/s over the GPU's dense bf16 peak, the peak named in the line),
peak GPU memory allocated and reserved, peak host RSS, the resolved DeepSpeed config and the versions. A run
that fails (GPU or host out of memory, ...) gets a line too, with its exit code and the error.

Configs: the names of accelerate_configs/*.yaml (single_gpu, zero2, zero2_offload, zero3, zero3_offload,
zero3_offload_optimizer, fsdp2, ...), `seed` (ds_configs/reference/seed_zero3_offload.json exactly as the seed
document wrote it: fp16, its WarmupDecayLR scheduler, accumulation 1), or NAME=PATH.json for any DeepSpeed JSON
(launched like zero3_offload). `--ds_set KEY=VALUE` changes a DeepSpeed value for a run (dotted keys, e.g.
zero_optimization.sub_group_size=1e8), to try a setting without writing a file.

`--tiny` shrinks every dimension so the whole path runs on a CPU in a minute (tests/test_benchmark.py).
"""

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets: the MFU denominator.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}
RECIPE_DEFAULT_CONFIG = {
    "llava": "recipes/configs/llava.yaml",
    "qwen_vl": "recipes/configs/qwen_vl.yaml",
    "chexagent": "recipes/configs/chexagent_stage2.yaml",
}
SEED_CONFIG = REPO / "ds_configs" / "reference" / "seed_zero3_offload.json"
# What the seed document's config hard-codes, so a run with it has to match: fp16 and no accumulation.
SEED_ARGS = ["--fp16", "true", "--bf16", "false", "--allow_deepspeed_scheduler", "true"]
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip


# ---- the model ----------------------------------------------------------------------------------------------------
def tiny_config(config, family: str):
    """The same architecture with every dimension small (for the CPU test of this script)."""
    text = config.text_config
    for key, value in TINY_TEXT.items():
        if hasattr(text, key):
            setattr(text, key, value)
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[: text.num_hidden_layers]
    if hasattr(text, "head_dim"):
        text.head_dim = 16
    if family == "qwen_vl":
        text.rope_parameters = {**text.rope_parameters, "mrope_section": [2, 3, 3]}
        vision = config.vision_config
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 4, 32, 64, 2
        vision.out_hidden_size, vision.fullatt_block_indexes = 64, [3]
    else:
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads = (
            32, 64, 2, 2,
        )  # fmt: skip
    return config


def build_processor(known, family: str):
    """The family's processor from local parts, at the model's image size; returns (processor, token ids)."""
    import make_tiny_model as tiny
    from transformers import (
        CLIPImageProcessor,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        SiglipImageProcessor,
    )

    size = known.image_size
    if family == "qwen_vl":
        tokenizer = tiny.build_qwen_tokenizer()
        pixels = dict(min_pixels=size * size, max_pixels=size * size)
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(
                patch_size=14, merge_size=2, temporal_patch_size=2, **pixels
            ),
            video_processor=Qwen2VLVideoProcessor(
                patch_size=14, merge_size=2, temporal_patch_size=2, **pixels
            ),
            tokenizer=tokenizer,
            chat_template=tiny.QWEN_CHAT_TEMPLATE,
        )
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tiny.QWEN_TOKEN_NAMES.items()}
        return processor, ids
    tokenizer = tiny.build_tokenizer("llava")
    if family == "llava":  # CLIP ViT-L/14 at 336: 576 patches + a class token that "default" drops
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        extra = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        template = tiny.LLAVA_CHAT_TEMPLATE
    else:  # CheXagent-2: SigLIP at 384/16, every patch an image token
        image_processor = SiglipImageProcessor(size={"height": size, "width": size})
        extra = dict(patch_size=16, vision_feature_select_strategy="full", num_additional_image_tokens=0)
        template = tiny.CHEXAGENT_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **extra
    )
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return processor, ids


def build_model_folder(name: str, folder: Path, tiny: bool) -> int:
    """Save a random-weight model of `name`'s architecture and its processor; returns the parameter count."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_recipes.known_models import KNOWN_MODELS

    known = KNOWN_MODELS[name]
    count_file = folder / "parameter_count.txt"
    if count_file.is_file():
        return int(count_file.read_text())
    processor, ids = build_processor(known, known.recipe)
    config = known.config()
    if tiny:
        config = tiny_config(config, known.recipe)
    # The tokenizer is built here (a small vocabulary); the model keeps its real vocabulary size, and its
    # media and special token ids point at the tokenizer's.
    for key, value in ids.items():
        if key in ("pad_token_id", "eos_token_id"):
            setattr(config.text_config, key, value)
        else:
            setattr(config, key, value)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    torch.manual_seed(0)
    with torch.device(device):  # a multi-billion-parameter model builds in seconds on a GPU, minutes on a CPU
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    count_file.write_text(f"{count}\n")
    print(
        f"built {name}{' (tiny)' if tiny else ''}: {count / 1e9:.3f}B parameters in {time.time() - start:.0f} s"
    )
    del model
    return count


# ---- the data -----------------------------------------------------------------------------------------------------
def sample_length(processor, words: int, image_path: Path | list[Path]) -> int:
    """Tokens of one synthetic sample, counted by the recipes' own tokenization (image tokens included)."""
    from vlm_recipes.data import ConversationDataset, normalize_record

    images = image_path if isinstance(image_path, list) else [image_path]
    messages, _, _ = normalize_record(record(words, images))
    dataset = ConversationDataset([{"messages": messages, "images": images, "videos": [], "source": "probe"}],
                                  processor, max_length=None)  # fmt: skip
    return int(dataset[0]["input_ids"].shape[-1])


def record(words: int, image: Path | list[Path], index: int = 0) -> dict:
    # Half the words in the question, half in the answer, so half the text tokens carry a label.
    images = image if isinstance(image, list) else [image]
    question = " ".join(["red"] * (words // 2))
    answer = " ".join(["blue"] * (words - words // 2))
    return {
        "id": f"bench-{index}",
        **({"images": [path.name for path in images]} if images else {}),
        "conversations": [
            {"from": "human", "value": "<image>\n" * len(images) + question},
            {"from": "gpt", "value": answer},
        ],
    }


def write_images(folder: Path, image_size: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for k in range(8):  # noise: the image processor does its full work on every image
        path = folder / f"image_{k}.png"
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return images


def write_dataset(folder: Path, processor, image_size: int, seq_len: int, records: int) -> int:
    """A LLaVA-format JSONL where every sample is exactly seq_len tokens (or the closest above); its length."""
    images = write_images(folder, image_size)
    base = sample_length(processor, 2, images[0])
    if base > seq_len:
        raise SystemExit(f"--seq_len {seq_len} is shorter than one image and the template ({base} tokens)")
    words = 2 + (seq_len - base)  # one token per word, measured and corrected below
    for _ in range(20):
        length = sample_length(processor, words, images[0])
        if length == seq_len:
            break
        words += seq_len - length
    with open(folder / "train.jsonl", "w") as out:
        for k in range(records):
            out.write(json.dumps(record(words, images[k % len(images)], k)) + "\n")
    return length


# The length mix (--length_mix): shaped like LLaVA-1.5's instruction mix (llava_v1_5_mix665k.json, the LLaVA-1.5
# paper's Table 7): 466k short-answer VQA records (VQAv2 83k, GQA 72k, OKVQA 9k, A-OKVQA 66k, OCR-VQA 80k, TextCaps
# 22k, RefCOCO 48k, VG 86k), grouped there into several question-answer turns per image; 158k LLaVA-Instruct
# conversations, detailed descriptions and reasoning; 40k ShareGPT text-only chats, long, cut at the 2,048-token
# limit. The shares are the mix's; the text lengths are a model of each kind (log-normal, medians and spreads
# chosen to match those kinds of data, not measured from the file, which this machine cannot download). LLaVA-1.5
# has at most one image a sample; a tenth of the image samples here get 2 or 3 (our addition, so that multi-image
# batches are timed too). Every sample fits --seq_len: text is cut where images and text would not.
# (name, share, text tokens: median, log-spread, images: {count: share among the kind's samples})
LENGTH_MIX = (
    ("short-answer VQA, multi-turn", 0.70, 120, 0.6, {1: 0.90, 2: 0.07, 3: 0.03}),
    ("LLaVA-Instruct conversation / detail / reasoning", 0.24, 280, 0.5, {1: 0.90, 2: 0.07, 3: 0.03}),
    ("ShareGPT, text only", 0.06, 900, 0.8, {0: 1.0}),
)


def write_length_mix(folder: Path, processor, image_size: int, seq_len: int, records: int) -> dict:
    """A LLaVA-format JSONL of `records` samples drawn from LENGTH_MIX (seed 0); what was drawn."""
    import numpy as np

    images = write_images(folder, image_size)
    rng = np.random.default_rng(0)
    base = {k: sample_length(processor, 2, images[:k]) for k in range(4)}  # template + k images, 2 words
    lengths, counts = [], {k: 0 for k in range(4)}
    with open(folder / "train.jsonl", "w") as out:
        for index in range(records):
            _, _, median, spread, image_shares = LENGTH_MIX[
                rng.choice(len(LENGTH_MIX), p=[kind[1] for kind in LENGTH_MIX])
            ]
            count = int(rng.choice(list(image_shares), p=list(image_shares.values())))
            while count and base[count] > seq_len - 8:  # images that do not fit: fewer of them
                count -= 1
            words = int(min(rng.lognormal(np.log(median), spread), seq_len - base[count] + 2))
            picked = [images[(index + j) % len(images)] for j in range(count)]
            out.write(json.dumps(record(max(words, 2), picked, index)) + "\n")
            lengths.append(base[count] - 2 + max(words, 2))  # one token a word (the words are single tokens)
            counts[count] += 1
    return {
        "records": records, "mean_tokens": round(float(np.mean(lengths)), 1),
        "median_tokens": int(np.median(lengths)), "max_tokens": int(max(lengths)),
        "images_per_sample": {str(k): round(v / records, 3) for k, v in counts.items()},
    }  # fmt: skip


# ---- one run ------------------------------------------------------------------------------------------------------
def set_dotted(config: dict, dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    try:
        config[last] = json.loads(value)  # numbers, true/false, lists, quoted strings
    except ValueError:
        config[last] = value  # a bare word: a string


def launch_config(config_name: str, run_dir: Path, ds_set: list[str]) -> tuple[Path, Path | None, list[str]]:
    """(accelerate YAML, DeepSpeed JSON override or None, extra recipe arguments) for a config name."""
    extra: list[str] = []
    if config_name == "seed":
        yaml_path, ds_path, extra = (
            REPO / "accelerate_configs/zero3_offload.yaml",
            SEED_CONFIG,
            list(SEED_ARGS),
        )
    elif "=" in config_name:
        yaml_path, ds_path = (
            REPO / "accelerate_configs/zero3_offload.yaml",
            Path(config_name.split("=", 1)[1]),
        )
    else:
        yaml_path, ds_path = REPO / "accelerate_configs" / f"{config_name}.yaml", None
        if not yaml_path.is_file():
            raise SystemExit(f"unknown config {config_name}: no {yaml_path}")
        text = yaml_path.read_text()
        for line in text.splitlines():
            if line.strip().startswith("deepspeed_config_file:"):
                ds_path = REPO / line.split(":", 1)[1].strip()
        if ds_path is None and "distributed_type: FSDP" not in text:
            extra = [
                "--deepspeed",
                "none",
            ]  # the recipe YAMLs name zero3_offload.json; this config runs without
    if ds_set:
        if ds_path is None:
            raise SystemExit(f"--ds_set needs a DeepSpeed config; {config_name} has none")
        config = json.loads(Path(ds_path).read_text())
        for item in ds_set:
            key, value = item.split("=", 1)
            set_dotted(config, key, value)
        ds_path = run_dir / "ds_config.json"
        ds_path.parent.mkdir(parents=True, exist_ok=True)
        ds_path.write_text(json.dumps(config, indent=2) + "\n")
    return yaml_path, ds_path, extra


def error_summary(log: str, returncode) -> str:
    if isinstance(returncode, str):  # "timeout after N s"
        return returncode
    for needle in ("CUDA out of memory", "OutOfMemoryError", "out of memory", "Killed", "Error: ", "Error"):
        lines = [line for line in log.splitlines() if needle in line and "ChildFailedError" not in line]
        if lines:
            return lines[-1].strip()[:500]
    # A worker killed by SIGKILL leaves no traceback; the launcher itself exits 1 and names the signal.
    if returncode in (-9, 137) or "Signal 9 (SIGKILL)" in log or "exitcode: -9" in log:
        return "a process was killed by SIGKILL, no traceback (the kernel's OOM killer: host RAM exhausted?)"
    return f"exit code {returncode}"


# Environment variables that change speed or memory: each row records those that were set.
RECORDED_ENVIRONMENT = ("PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST",
                        "NCCL_NVLS_ENABLE", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION")  # fmt: skip


# How a micro-batch is made of samples (--batching): as they come, padded to the longest; grouped by length
# (the recipes' --train_sampling_strategy group_by_length); or packed into rows of --seq_len tokens (--packing true).
BATCHING_ARGS = {
    "padded": [],
    "grouped": ["--train_sampling_strategy", "group_by_length"],
    "packed": ["--packing", "true"],
}


def steady_token_figures(stats: list[dict], warmup: int) -> dict:
    """Sample tokens per second (padding left out) and the padding fraction, over the steps after the warm-up, all
    ranks together: the figures that compare padded, grouped and packed batches of the same data."""
    rank0 = stats[0]
    steps = [
        k
        for k in range(len(rank0["step_times_s"]))
        if k >= warmup and k not in rank0["profiled_steps_excluded"]
    ]
    real = sum(rank["real_tokens_per_step"][k] for rank in stats for k in steps)
    slots = sum(rank["slots_per_step"][k] for rank in stats for k in steps)
    seconds = sum(rank0["step_times_s"][k] for k in steps)
    return {
        "real_tokens_per_s": round(real / seconds, 1) if seconds else None,
        "padding_fraction": round(1 - real / slots, 4) if slots else None,
        "real_tokens_per_step": round(real / len(steps), 1) if steps else None,
    }


def run_one(
    args,
    config_name: str,
    model_dir: Path,
    data_dir: Path,
    params: int,
    seq_len: int,
    batching: str = "padded",
) -> dict:
    from vlm_recipes.known_models import KNOWN_MODELS
    from vlm_recipes.run_stats import read_run_stats

    known = KNOWN_MODELS[args.model]
    label = config_name.split("=", 1)[0] + (f"+{'+'.join(args.ds_set)}" if args.ds_set else "")
    micro_batch = args.packed_micro_batch or args.micro_batch if batching == "packed" else args.micro_batch
    run_dir = (
        Path(args.work_dir)
        / "runs"
        / f"{args.model}-{args.mode}-{label.replace('/', '_')}-{batching}-{int(time.time())}"
    )
    yaml_path, ds_path, extra = launch_config(config_name, run_dir, args.ds_set)
    grad_accum = 1 if config_name == "seed" else args.grad_accum
    recipe_args = [
        "--config", RECIPE_DEFAULT_CONFIG[known.recipe],
        "--model_name_or_path", model_dir, "--dataset_path", data_dir / "train.jsonl", "--image_root", data_dir,
        "--output_dir", run_dir, "--overwrite_output_dir", "true", "--save_final_model", "false",
        "--max_steps", args.steps, "--per_device_train_batch_size", micro_batch,
        "--gradient_accumulation_steps", grad_accum, "--max_length", seq_len,
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", max(args.steps // 4, 1),
        "--dataloader_num_workers", args.dataloader_workers,
        "--freeze_vision_tower", "false" if args.mode == "full" else "true",
        "--use_lora", "true" if args.mode == "lora" else "false",
        "--gradient_checkpointing", "false" if args.no_gradient_checkpointing else "true",
        "--attn_implementation", args.attn_implementation,
        *extra, *BATCHING_ARGS[batching], *shlex.split(args.recipe_args),
    ]  # fmt: skip
    if known.recipe == "qwen_vl":
        recipe_args += ["--min_pixels", known.image_size**2, "--max_pixels", known.image_size**2]
    if known.recipe == "chexagent":  # stage 2's YAML assembles nothing; train the given checkpoint
        recipe_args += ["--vision_model_name_or_path", "", "--text_model_name_or_path", ""]
    launcher = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
                "--config_file", yaml_path, "--num_processes", args.num_processes,
                "--main_process_port", str(29500 + os.getpid() % 1000),
                *shlex.split(args.launch_args)]  # fmt: skip
    if ds_path is not None:
        launcher += ["--deepspeed_config_file", ds_path]
    command = [str(part) for part in [*launcher, REPO / "recipes" / f"{known.recipe}.py", *recipe_args]]
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {args.model} {args.mode} {label}: {shlex.join(command)}", flush=True)
    start = time.time()
    env = {**os.environ, **({"VLM_RECIPES_PROFILE_DIR": str(run_dir / "profile")} if args.profile else {})}
    if args.profile_start is not None:
        env["VLM_RECIPES_PROFILE_START"] = str(args.profile_start)
    with open(run_dir / "log.txt", "w") as log:
        # Its own process group, so that a run past --timeout is stopped with every rank it started (they would
        # hold the GPU's memory for the next config); it is recorded as a failed row and the others still run.
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = f"timeout after {args.timeout} s"
    log_text = (run_dir / "log.txt").read_text(errors="replace")
    global_batch = micro_batch * grad_accum * args.num_processes
    line = {
        "model": args.model, "config": label, "mode": args.mode, "micro_batch": micro_batch,
        "batching": batching, "length_mix": args.length_mix,
        "grad_accum": grad_accum, "num_processes": args.num_processes, "seq_len": seq_len,
        "image_size": known.image_size, "gradient_checkpointing": not args.no_gradient_checkpointing,
        "attn_implementation": args.attn_implementation, "recipe_args": args.recipe_args,
        "launch_args": args.launch_args,
        "env": {name: os.environ[name] for name in RECORDED_ENVIRONMENT if name in os.environ},
        "parameters": params, "steps": args.steps,
        "wall_s": round(time.time() - start, 1), "command": shlex.join(command), "run_dir": str(run_dir),
    }  # fmt: skip
    stats = read_run_stats(run_dir)
    if returncode != 0 or not stats:
        print(log_text[-3000:])
        return {**line, "status": "failed", "returncode": returncode,
                "error": error_summary(log_text, returncode)}  # fmt: skip
    rank0 = stats[0]
    step = statistics.median(s["median_step_time_s"] for s in stats)
    figures = steady_token_figures(stats, rank0["warmup_steps_excluded"])
    # Fixed-length samples: every slot is a sample's token. A length mix: only the samples' own tokens count.
    tokens_per_s = figures["real_tokens_per_s"] if args.length_mix else global_batch * seq_len / step
    gpu = rank0.get("gpu_name") or ""
    peak = next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in gpu), None)
    resolved = run_dir / "ds_config_resolved.json"
    return {
        **line,
        "status": "ok",
        **figures,
        "median_step_time_s": round(step, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_gpu": round(tokens_per_s / args.num_processes, 1),
        "samples_per_s": round(global_batch / step, 3),
        "mfu": round(6 * params * tokens_per_s / args.num_processes / (peak * 1e12), 4) if peak else None,
        "peak_bf16_tflops_used": peak,
        "gpu_peak_allocated_gib": max((s["gpu_peak_allocated_gib"] or 0) for s in stats),
        "gpu_peak_reserved_gib": max((s["gpu_peak_reserved_gib"] or 0) for s in stats),
        "host_peak_rss_gib_per_process": max(s["process_peak_rss_gib"] for s in stats),
        "host_peak_rss_gib_all_processes": sum(s["process_peak_rss_gib"] for s in stats),
        "machine_peak_used_gib": rank0["machine_peak_used_gib"],
        "machine_used_before_training_gib": rank0["machine_used_before_training_gib"],
        "per_process": [
            {
                "rank": s["rank"],
                "gpu_peak_allocated_gib": s["gpu_peak_allocated_gib"],
                "gpu_peak_reserved_gib": s["gpu_peak_reserved_gib"],
                "host_peak_rss_gib": s["process_peak_rss_gib"],
            }
            for s in stats
        ],  # fmt: skip
        "step_times_s": rank0["step_times_s"],
        "resolved_ds_config": json.loads(resolved.read_text()) if resolved.is_file() else None,
        "gpu": gpu,
    }


def versions() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    try:
        import deepspeed

        deepspeed_version = deepspeed.__version__
    except ImportError:
        deepspeed_version = None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "deepspeed": deepspeed_version, "peft": peft.__version__, "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }  # fmt: skip


def run(args) -> None:
    from transformers import AutoProcessor

    from vlm_recipes.known_models import KNOWN_MODELS

    known = KNOWN_MODELS[args.model]
    work = Path(args.work_dir)
    model_dir = work / "models" / (args.model + ("-tiny" if args.tiny else ""))
    params = build_model_folder(args.model, model_dir, args.tiny)
    processor = AutoProcessor.from_pretrained(model_dir)
    records = args.micro_batch * args.grad_accum * args.num_processes * (args.steps + 2)
    if args.length_mix:  # enough samples for every step even when rows hold several (packed)
        data_dir = work / "data" / f"{known.recipe}-{known.image_size}-{args.seq_len}-mix"
        seq_len, drawn = (
            args.seq_len,
            write_length_mix(data_dir, processor, known.image_size, args.seq_len, 8 * records),
        )
        print(f"length mix: {json.dumps(drawn)}", flush=True)
    else:
        data_dir = work / "data" / f"{known.recipe}-{known.image_size}-{args.seq_len}"
        seq_len, drawn = write_dataset(data_dir, processor, known.image_size, args.seq_len, records), None
    environment = versions()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    unknown = set(args.batching.split(",")) - set(BATCHING_ARGS)
    if unknown:
        raise SystemExit(
            f"--batching: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BATCHING_ARGS)}"
        )
    runs = [(config, batching) for config in args.configs.split(",") for batching in args.batching.split(",")]
    for config_name, batching in runs:
        line = {
            **run_one(args, config_name, model_dir, data_dir, params, seq_len, batching),
            "versions": environment,
        }
        if drawn:
            line["length_mix_drawn"] = drawn
        line["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(args.results, "a") as out:
            out.write(json.dumps(line) + "\n")
        shown = {k: line.get(k) for k in ("config", "batching", "status", "median_step_time_s", "tokens_per_s",
                                          "padding_fraction", "mfu",
                                          "gpu_peak_allocated_gib", "host_peak_rss_gib_per_process", "error")}  # fmt: skip
        print("RESULT " + json.dumps(shown), flush=True)


# ---- the report ---------------------------------------------------------------------------------------------------
def planner_estimate_gib(row: dict) -> tuple[float, float] | None:
    """The memory planner's (GPU allocated, host per process) estimate for a benchmark row, from the DeepSpeed
    config the run resolved; None where the planner does not model the run (Liger kernels)."""
    from vlm_recipes.memory import (
        SPEED_ORDER,
        Hardware,
        TrainingSetup,
        estimate,
        image_tokens_for,
        load_model_config,
        model_shape,
    )

    name = "zero3_offload" if row["config"] == "seed" else re.split(r"[+(]", row["config"], maxsplit=1)[0]
    if name not in SPEED_ORDER or "liger" in row.get("recipe_args", ""):
        return None
    name_and_config = load_model_config(row["model"])
    shape = model_shape(*name_and_config)
    setup = TrainingSetup.from_mode(
        row["mode"], train_vision_tower=row["mode"] == "full", micro_batch=row["micro_batch"],
        seq_len=row["seq_len"], gradient_checkpointing=row["gradient_checkpointing"],
        image_tokens=image_tokens_for(name_and_config[1].vision_config, row["image_size"]), dataloader_workers=0,
        compensated_updates="--compensated_bf16_updates true" in row.get("recipe_args", ""),
    )  # fmt: skip
    hardware = Hardware(gpus_per_node=row["num_processes"])
    planned = estimate(name, shape, setup, hardware, ds_config=row.get("resolved_ds_config"))
    # Data-loader workers (none counted above) are processes of their own: the measured RSS is one training
    # process's, which holds its share of the node's host estimate.
    return planned.gpu_allocated_bytes / 2**30, planned.host_bytes / row["num_processes"] / 2**30


def versus(planned: float, measured: float) -> str:
    return f"{planned:.1f} ({100 * (planned - measured) / measured:+.0f}%)"


# What must match for two runs to differ only in their number of GPUs (the per-GPU micro-batch stays).
SAME_SETTING = ("model", "mode", "config", "micro_batch", "grad_accum", "seq_len", "image_size",
                "gradient_checkpointing", "attn_implementation", "recipe_args", "launch_args")  # fmt: skip


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"  # None: no GPU (a CPU run)


def scaling_table(lines: list[dict]) -> None:
    """Each run on N > 1 GPUs against the latest 1-GPU run of the same setting before it: tokens/s per GPU and
    the scaling efficiency (per-GPU tokens/s over the 1-GPU run's), with each process's GPU and host peaks."""
    rows = []
    for k, x in enumerate(lines):
        if x["status"] != "ok" or x["num_processes"] < 2:
            continue
        singles = [
            y for y in lines[:k]
            if y["status"] == "ok" and y["num_processes"] == 1 and all(y.get(f, "") == x.get(f, "") for f in SAME_SETTING)
        ]  # fmt: skip
        base = singles[-1]["tokens_per_s"] if singles else None
        per_gpu = x["tokens_per_s"] / x["num_processes"]
        processes = x.get("per_process") or []
        gpu = " / ".join(gib(p["gpu_peak_allocated_gib"]) for p in processes) or "-"
        host = " / ".join(gib(p["host_peak_rss_gib"]) for p in processes) or "-"
        rows.append(
            f"| {x['model']} | {x['mode']} | {x['config']} | {x['micro_batch']} x {x['grad_accum']} | "
            f"{x['num_processes']} | {x['median_step_time_s']:.2f} | {x['tokens_per_s']:,.0f} | {per_gpu:,.0f} | "
            f"{f'{base:,.0f}' if base else '-'} | {f'{100 * per_gpu / base:.0f}%' if base else '- (no 1-GPU run)'} "
            f"| {gpu} | {host} |"
        )
    if rows:
        print(
            "\nScaling: each multi-GPU run against the last 1-GPU run of the same setting (same per-GPU batch)\n"
        )
        print("| model | mode | config | micro-batch x accum (per GPU) | GPUs | step (s) | tokens/s | tokens/s per GPU "
              "| 1-GPU tokens/s | scaling efficiency | GPU peak alloc per process (GiB) | host RSS per process "
              "(GiB) |")  # fmt: skip
        print("|" + " --- |" * 12)
        print("\n".join(rows))


def run_setting(x: dict) -> str:
    """Attention, checkpointing and the run's other flags (recipe and launch arguments), for the tables."""
    other = (
        f"{x.get('recipe_args', '')} {x.get('launch_args', '')}".replace("--", "")
        .replace(" true", "")
        .strip()
    )
    if "expandable_segments:True" in x.get("env", {}).get("PYTORCH_CUDA_ALLOC_CONF", ""):
        other = f"{other} expandable_segments".strip()
    setting = f"{x['attn_implementation']}, {'on' if x['gradient_checkpointing'] else 'off'}"
    return setting + (f", {other}" if other else "")


def length_mix_table(lines: list[dict]) -> None:
    """The length-mix runs: sample tokens/s and the padding fraction of each batching, against the latest
    fixed-length run of the same model, mode and config before it."""
    rows = []
    for k, x in enumerate(lines):
        if not x.get("length_mix"):
            continue
        batch = f"{x['micro_batch']} x {x['grad_accum']} x {x['num_processes']}"
        if x["status"] != "ok":
            rows.append(f"| {x['model']} | {x['mode']} | {x['config']} | {x['batching']} | {run_setting(x)} | "
                        f"{batch} | failed: {x['error'][:120]} | | | |")  # fmt: skip
            continue
        fixed = [
            y for y in lines[:k]
            if y["status"] == "ok" and not y.get("length_mix")
            and all(y.get(f) == x.get(f) for f in ("model", "mode", "config", "attn_implementation"))
        ]  # fmt: skip
        base = fixed[-1]["tokens_per_s"] if fixed else None
        mfu = f"{100 * x['mfu']:.1f}%" if x.get("mfu") is not None else "-"
        against = f"{100 * x['real_tokens_per_s'] / base:.0f}% of {base:,.0f}" if base else "-"
        rows.append(
            f"| {x['model']} | {x['mode']} | {x['config']} | {x['batching']} | {run_setting(x)} | {batch} | "
            f"{x['real_tokens_per_s']:,.0f} | {100 * x['padding_fraction']:.1f}% | {mfu} | {against} |"
        )
    if rows:
        print("\nLength mix (--length_mix): the samples' own tokens per second, and the share of computed slots that "
              "were padding\n")  # fmt: skip
        print("| model | mode | config | batching | attention, checkpointing, other | micro-batch x accum x GPUs | "
              "sample tokens/s | padding | MFU | vs the fixed-length run |")  # fmt: skip
        print("|" + " --- |" * 10)
        print("\n".join(rows))


def report(args) -> None:
    lines = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    header = ("| model | mode | config | attention, checkpointing, other | micro-batch x accum x GPUs | step (s) | "
              "tokens/s | MFU | GPU peak alloc / reserved (GiB) | planner GPU (GiB) | host RSS peak (GiB) | "
              "planner host (GiB) |")  # fmt: skip
    print(header)
    print("|" + " --- |" * 12)
    for x in lines:
        setting = run_setting(x)
        batch = f"{x['micro_batch']} x {x['grad_accum']} x {x['num_processes']}"
        if x["status"] != "ok":
            print(f"| {x['model']} | {x['mode']} | {x['config']} | {setting} | {batch} | failed: "
                  f"{x['error'][:160]} | | | | | | |")  # fmt: skip
            continue
        mfu = f"{100 * x['mfu']:.1f}%" if x.get("mfu") is not None else "-"
        measured_gpu, measured_host = x["gpu_peak_allocated_gib"], x["host_peak_rss_gib_per_process"]
        planned = planner_estimate_gib(x) if measured_gpu else None  # a CPU run has no GPU peak
        gpu_text, host_text = (
            (versus(planned[0], measured_gpu), versus(planned[1], measured_host)) if planned else ("-", "-")
        )
        print(
            f"| {x['model']} | {x['mode']} | {x['config']} | {setting} | {batch} | {x['median_step_time_s']:.2f} | "
            f"{x['tokens_per_s']:,.0f} | {mfu} | {measured_gpu:.1f} / {x['gpu_peak_reserved_gib']:.1f} | "
            f"{gpu_text} | {measured_host:.1f} | {host_text} |"
        )
    scaling_table(lines)
    length_mix_table(lines)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [x for x in lines if x["status"] == "ok"]
        labels = [
            f"{k + 1}. {x['model']} {x['config'][:40]}\n{x['attn_implementation']}, checkpointing "
            f"{'on' if x['gradient_checkpointing'] else 'off'}, {x['micro_batch']} x {x['grad_accum']}"
            for k, x in enumerate(ok)
        ]  # one bar per run, even where two runs share a setting
        figure, axis = plt.subplots(figsize=(10, 0.45 * len(ok) + 1.5))
        axis.barh(labels, [x["tokens_per_s"] for x in ok])
        axis.invert_yaxis()
        axis.set_xlabel("tokens/s (one GPU)")
        axis.tick_params(axis="y", labelsize=7)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="benchmark one model under one or more configs")
    run_parser.add_argument("--model", required=True, choices=["llava-1.5-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b",
                                                              "chexagent-2-3b"])  # fmt: skip
    run_parser.add_argument("--configs", default="seed,zero3_offload", help="comma-separated (see above)")
    run_parser.add_argument("--mode", default="full", choices=["full", "lora"],
                            help="full: every weight trains, the vision tower too; lora: the recipe's LoRA")  # fmt: skip
    run_parser.add_argument("--micro_batch", type=int, default=4)
    run_parser.add_argument("--grad_accum", type=int, default=1, help="(the seed's config forces 1)")
    run_parser.add_argument(
        "--seq_len", type=int, default=512, help="tokens per sample, image tokens included"
    )
    run_parser.add_argument("--steps", type=int, default=12, help="optimizer steps; the first 3 are warm-up")
    run_parser.add_argument(
        "--length_mix",
        action="store_true",
        help="samples of mixed lengths and 0-3 images, shaped like LLaVA-1.5's mix (LENGTH_MIX), "
        "each at most --seq_len tokens; tokens/s then counts the samples' tokens only",
    )
    run_parser.add_argument(
        "--batching",
        default="padded",
        help="comma-separated: padded, grouped (group_by_length), packed (--packing true)",
    )
    run_parser.add_argument(
        "--packed_micro_batch",
        type=int,
        default=None,
        help="rows of --seq_len tokens per micro-batch when packed (default: --micro_batch)",
    )
    run_parser.add_argument("--num_processes", type=int, default=1)
    run_parser.add_argument("--dataloader_workers", type=int, default=4)
    run_parser.add_argument("--attn_implementation", default="sdpa")
    run_parser.add_argument("--no_gradient_checkpointing", action="store_true")
    run_parser.add_argument("--ds_set", action="append", default=[], help="KEY=VALUE, dotted, repeatable")
    run_parser.add_argument("--recipe_args", default="", help="more recipe arguments, as one string")
    run_parser.add_argument(
        "--launch_args",
        default="",
        help="more `accelerate launch` arguments, one string, given after '=' "
        "(--launch_args=--dynamo_use_regional_compilation: accelerate launch sets the regional-compilation switch "
        "itself, so only its own flag turns it on)",
    )
    run_parser.add_argument("--work_dir", default="runs/benchmark")
    run_parser.add_argument("--results", default="runs/benchmark/results.jsonl")
    run_parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    run_parser.add_argument("--profile", action="store_true", help="PyTorch profiler tables in <run>/profile")
    run_parser.add_argument(
        "--profile_start",
        type=int,
        help="with --profile: profile the two steps after this many (default: the warm-up)",
    )
    run_parser.add_argument("--tiny", action="store_true", help="every dimension small: the CPU test")
    report_parser = commands.add_parser("report", help="a markdown table (and a plot) from a results file")
    report_parser.add_argument("results")
    report_parser.add_argument("--plot", help="write a bar chart of tokens/s here")
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
