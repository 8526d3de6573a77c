"""What a frozen vision tower costs when backward runs through it: one training step (forward + backward, gradient
checkpointing with reentrant recomputation, as the recipes' YAMLs set it) with transformers' own input-gradient hooks
(every sub-model's input embeddings, the frozen tower's too) against `input_grads_only_where_trained` (only the
sub-models whose checkpointed blocks train). Prints step time, peak GPU memory and the backward calls through the
tower's frozen Linear layers.

    python scripts/device/frozen_tower_backward.py --model qwen2.5-vl-3b                  # real size, on a GPU
    python scripts/device/frozen_tower_backward.py --model llava-1.5-7b --micro_batch 4 --seq_len 1024
    python scripts/device/frozen_tower_backward.py --model qwen2.5-vl-3b --tiny           # the same on a CPU

Random weights of the model's real architecture (vlm_recipes.known_models), one image per sample at the benchmark's
size, the vision tower frozen and everything else trained, as the recipes' default configs train.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/: the benchmark's model builders
from benchmark import build_processor, tiny_config  # noqa: E402

from vlm_recipes.collator import ConversationCollator  # noqa: E402
from vlm_recipes.known_models import KNOWN_MODELS  # noqa: E402
from vlm_recipes.masking import tokenize_conversation  # noqa: E402
from vlm_recipes.training import input_grads_only_where_trained, set_requires_grad  # noqa: E402


def build(name: str, tiny: bool, device: str):
    from transformers import AutoModelForImageTextToText

    known = KNOWN_MODELS[name]
    processor, ids = build_processor(known, known.recipe)
    config = tiny_config(known.config(), known.recipe) if tiny else known.config()
    for key, value in ids.items():
        setattr(config.text_config if key in ("pad_token_id", "eos_token_id") else config, key, value)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return known, processor, model


def make_batch(processor, image_size: int, micro_batch: int, seq_len: int, device: str, dtype):
    words = " ".join(["red"] * seq_len)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": words}]},
    ]
    image = Image.new("RGB", (image_size, image_size), (120, 30, 30))
    sample = tokenize_conversation(processor, messages, [image], max_length=seq_len)
    batch = ConversationCollator(processor)([sample] * micro_batch)
    return {
        key: value.to(device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in batch.items()
    }


def measure(model, tower, batch, steps: int, device: str = "cpu") -> dict:
    """One warm-up step and `steps` timed ones (forward + backward, no optimizer step; the gradients of the last
    are left in place), with gradient checkpointing turned on the Trainer's way, then off again. Counts the backward
    calls through the tower's frozen Linear layers."""
    calls = []
    handles = [
        module.register_full_backward_hook(lambda *args: calls.append(1))
        for module in tower.modules()
        if isinstance(module, torch.nn.Linear) and not any(p.requires_grad for p in module.parameters())
    ]
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
        if not step:
            calls_per_step = len(calls)
    for handle in handles:
        handle.remove()
    model.gradient_checkpointing_disable()
    return {
        "median_step_s": round(sorted(times)[len(times) // 2], 4) if times else None,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if device == "cuda" else None,
        "tower_backward_calls_per_step": calls_per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-vl-3b", choices=sorted(KNOWN_MODELS))
    parser.add_argument(
        "--tiny", action="store_true", help="every dimension small (a CPU check of this script)"
    )
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    known, processor, model = build(args.model, args.tiny, device)
    # As the recipes' default configs: the tower frozen, its projection into the language model trained (Qwen's
    # merger sits inside its vision tower; LLaVA's projector is a module of its own, trained already).
    tower = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
    set_requires_grad(tower, False)
    if hasattr(tower, "merger"):
        set_requires_grad(tower.merger, True)
    batch = make_batch(processor, known.image_size, args.micro_batch, args.seq_len, device, model.dtype)
    rows = {"transformers_hooks": measure(model, tower, batch, args.steps, device)}
    model.disable_input_require_grads()
    input_grads_only_where_trained(model)
    rows["only_where_trained"] = measure(model, tower, batch, args.steps, device)
    before, after = rows["transformers_hooks"], rows["only_where_trained"]
    result = {
        "model": args.model + (" (tiny)" if args.tiny else ""),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "micro_batch": args.micro_batch,
        "seq_len": batch["input_ids"].shape[1],
        **rows,
        "step_time_saved": round(1 - after["median_step_s"] / before["median_step_s"], 3),
    }
    for name, row in rows.items():
        print(f"{name:<20} {row['median_step_s']:.4f} s/step  peak GPU {row['peak_gpu_gib']} GiB  "
              f"tower backward calls {row['tower_backward_calls_per_step']}")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
