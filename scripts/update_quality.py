"""How precise are the updates of 16-bit training? One small causal LM trained the same way three times, at a
fine-tune's learning rate, with: fp32 weights and torch's AdamW (the reference); bf16 weights and torch's AdamW (what
`single_gpu` does without an fp32 master copy); bf16 weights and vlm_recipes.optim.CompensatedAdamW
(`--compensated_bf16_updates true`). Same initial weights, same batches, same order.

    python scripts/update_quality.py --steps 400 --lr 2e-5 --out docs/benchmarks/update_quality   # JSON + PNG

The task is learnable (token sequences from a fixed sparse Markov chain), the model a Qwen2 decoder with random
weights (std 0.02, as transformers initialises): at lr 2e-5 an Adam update is ~2e-5, below half the bf16 spacing
of a 0.02 weight (6e-5), so plain bf16 AdamW rounds most updates away. Prints one JSON line: the loss at the end of
each run (the mean of its last 10% of steps) and how far each curve strays from the fp32 one.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vlm_recipes.optim import CompensatedAdamW  # noqa: E402

VOCAB, SEQ, BATCH = 512, 64, 16


def markov_batches(steps: int, seed: int) -> list[torch.Tensor]:
    """Batches of token sequences from a fixed random Markov chain in which each token has 4 likely successors."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=generator)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(BATCH, SEQ, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=generator)
        for position in range(1, SEQ):
            pick = torch.randint(0, 4, (BATCH,), generator=generator)
            tokens[:, position] = successors[tokens[:, position - 1], pick]
        batches.append(tokens)
    return batches


def build_model(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def train(variant: str, batches, lr: float, seed: int) -> list[float]:
    model = build_model(seed)
    if variant != "fp32 AdamW":
        model = model.to(torch.bfloat16)
    optimizer_class = CompensatedAdamW if variant == "bf16 compensated AdamW" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for tokens in batches:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


VARIANTS = ("fp32 AdamW", "bf16 AdamW", "bf16 compensated AdamW")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for curves.json and curves.png")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    batches = markov_batches(args.steps, args.seed)
    curves = {variant: train(variant, batches, args.lr, args.seed) for variant in VARIANTS}
    tail = max(args.steps // 10, 1)
    reference = curves["fp32 AdamW"]
    summary = {
        "steps": args.steps, "lr": args.lr,
        "start_loss": round(reference[0], 4),
        "final_loss": {v: round(sum(c[-tail:]) / tail, 4) for v, c in curves.items()},
        "max_gap_to_fp32": {v: round(max(abs(a - b) for a, b in zip(c, reference, strict=True)), 4)
                            for v, c in curves.items() if v != "fp32 AdamW"},
    }  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "curves.json").write_text(json.dumps({"summary": summary, "curves": curves}) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        styles = {"fp32 AdamW": dict(linewidth=3, alpha=0.45), "bf16 AdamW": dict(linewidth=1),
                  "bf16 compensated AdamW": dict(linewidth=1, linestyle="--")}  # fmt: skip
        for (
            variant,
            losses,
        ) in curves.items():  # the fp32 line is wide so the compensated one shows on top of it
            axis.plot(losses, label=variant, **styles[variant])
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.set_title(f"update precision at lr {args.lr:g} (scripts/update_quality.py)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "curves.png", dpi=120)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
