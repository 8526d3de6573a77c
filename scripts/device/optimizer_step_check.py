"""What one optimizer step costs over a real model's trained weights, and whether the fused compensated step agrees
with the op-by-op one where it runs (issue 20: LLaVA-1.5-7B full with --compensated_bf16_updates true).

    python scripts/device/optimizer_step_check.py                       # on a GPU: LLaVA-1.5-7B's 7.06B weights
    python scripts/device/optimizer_step_check.py --model qwen2.5-vl-3b
    python scripts/device/optimizer_step_check.py --tiny                # the same on a CPU, small (make test runs it)

bf16 tensors of the model's real parameter shapes (vlm_recipes.known_models; random values, gradients of about the
size a loss gives), every one trained, as a full fine-tune with the vision tower trains them. Three optimizers, one
after the other on the same weights: torch's AdamW (fused on a GPU: what single_gpu runs, bf16 moments, small updates
rounded away), CompensatedAdamW op by op, CompensatedAdamW fused (vlm_recipes/optim.py). Each: 2 warm-up steps (the
fused one compiles in the first), then the mean of --steps timed ones. Before timing, the fused and op-by-op steps
run side by side from the same start on the first tensors, and their weight + compensation must agree to fp32
rounding. Prints one JSON line per optimizer: ms per step, the bytes each step must move at the least (weights,
gradients, moments and compensation read and written once) over that time.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/: the benchmark's model builders
from benchmark import tiny_config  # noqa: E402

from vlm_recipes.known_models import KNOWN_MODELS  # noqa: E402
from vlm_recipes.optim import CompensatedAdamW  # noqa: E402


def parameter_shapes(name: str, tiny: bool) -> list[torch.Size]:
    from transformers import AutoModelForImageTextToText

    known = KNOWN_MODELS[name]
    config = tiny_config(known.config(), known.recipe) if tiny else known.config()
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return [parameter.shape for parameter in model.parameters()]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def agreement(shapes, device: str) -> float:
    """Largest relative difference of weight + compensation between the fused and op-by-op steps after 3 steps."""
    torch.manual_seed(1)
    starts = [(torch.randn(shape, device=device) * 0.02).to(torch.bfloat16) for shape in shapes]
    runs = []
    for fused in (True, False):
        weights = [torch.nn.Parameter(start.clone()) for start in starts]
        optimizer = CompensatedAdamW(weights, lr=2e-5, weight_decay=0.01, fused=fused)
        torch.manual_seed(2)
        for _ in range(3):
            for weight in weights:
                weight.grad = (torch.randn(weight.shape, device=device) * 1e-3).to(torch.bfloat16)
            optimizer.step()
        runs.append([w.detach().float() + optimizer.state[w]["compensation"].float() for w in weights])
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*runs, strict=True))


def time_steps(make_optimizer, weights, steps: int, device: str) -> float:
    optimizer = make_optimizer(weights)
    for step in range(2 + steps):
        if step == 2:
            synchronize(device)
            start = time.perf_counter()
        optimizer.step()
    synchronize(device)
    elapsed = (time.perf_counter() - start) / steps
    del optimizer  # its states, before the next one makes its own
    if device == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llava-1.5-7b", choices=sorted(KNOWN_MODELS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="every dimension small, on the CPU")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shapes = parameter_shapes(args.model, args.tiny)
    elements = sum(shape.numel() for shape in shapes)

    worst = agreement(shapes[:8], device)
    print(
        json.dumps({"model": args.model, "device": device, "fused_vs_op_by_op_max_relative": worst}),
        flush=True,
    )
    if worst > 1e-5:
        print(f"the fused step disagrees with the op-by-op one by {worst:.2e} (relative)", file=sys.stderr)
        return 1

    torch.manual_seed(0)
    weights = [
        torch.nn.Parameter((torch.randn(shape, device=device) * 0.02).to(torch.bfloat16)) for shape in shapes
    ]
    for weight in weights:
        weight.grad = (torch.randn(weight.shape, device=device) * 1e-3).to(torch.bfloat16)
    cuda = device == "cuda"
    # name -> (how to make it, bytes per weight a step must read and write at the least: bf16 weight, gradient and
    # moments read, weight and moments written; the compensation read and written too)
    optimizers = {
        "torch AdamW, bf16 moments": (lambda w: torch.optim.AdamW(w, lr=2e-5, fused=cuda), 4 * 2 + 3 * 2),
        "CompensatedAdamW, op by op": (lambda w: CompensatedAdamW(w, lr=2e-5, fused=False), 5 * 2 + 4 * 2),
        "CompensatedAdamW, fused": (lambda w: CompensatedAdamW(w, lr=2e-5, fused=True), 5 * 2 + 4 * 2),
    }
    for name, (make, bytes_per_weight) in optimizers.items():
        seconds = time_steps(make, weights, args.steps, device)
        row = {
            "model": args.model, "device": device, "optimizer": name, "trained_weights": elements,
            "ms_per_step": round(1000 * seconds, 2),
            "least_bytes_moved_gb_per_s": round(elements * bytes_per_weight / seconds / 1e9, 1),
        }  # fmt: skip
        if cuda:
            row["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
