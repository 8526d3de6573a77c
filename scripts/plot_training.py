r"""Plot a training run's loss, learning rate, gradient norm and throughput from its trainer_state.json.

    python scripts/plot_training.py runs/demo/llava-finetuned

OUTPUT_DIR is a recipe's output_dir or one of its checkpoint-* folders (or the trainer_state.json itself).
The PNG, training_curves.png, is written next to trainer_state.json (or to --output). Panels, against the
optimizer step: the training loss (and the evaluation loss, when an eval set was given), the learning rate,
the gradient norm before clipping, and the throughput in tokens per second, which the Trainer logs only when
run with --include_num_input_tokens_seen true (it costs one all-gather per step). Losses and gradient norms
that span more than a decade are drawn on a log scale, so the late part of the run stays visible.

For live curves while training, the recipes' YAMLs log to TensorBoard (report_to: tensorboard; then
`tensorboard --logdir OUTPUT_DIR/runs`); pass --report_to wandb to the recipe to log to Weights & Biases.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed (or there) on a training machine
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

PNG_NAME = "training_curves.png"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "output_dir", type=Path, help="a recipe's output_dir, a checkpoint-* folder, or a trainer_state.json"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help=f"PNG path (default: {PNG_NAME} beside the state)"
    )
    return parser.parse_args()


def find_state_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    # A run that is still going, or was cut off, has its state only in its checkpoints.
    checkpoints = sorted(
        path.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    if checkpoints:
        return checkpoints[-1]
    sys.exit(
        f"error: no trainer_state.json in {path} or its checkpoint-* folders; pass the output_dir of a run "
        "(the Trainer writes it at every save and at the end of training)"
    )


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def plain_number(value: float, _position=None) -> str:
    # 0.002, 1e-05, 0.5, 3,500: no offset text above the axis, no SI prefixes (a "1 m" learning rate misleads).
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


PLAIN = FuncFormatter(plain_number)


def use_log_scale(axis, values: list[float]) -> None:
    """Log scale when the values span more than a decade, labelled at 1, 2, 3 and 5 times each power of ten."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        axis.yaxis.set_major_formatter(PLAIN)
        axis.yaxis.set_minor_formatter(NullFormatter())
    else:
        axis.yaxis.set_major_formatter(PLAIN)


def draw_panel(
    axis, title: str, ylabel: str, curves: list[tuple[str, list, list, str]], missing: str, log: bool = False
) -> None:
    axis.set_title(title, fontsize=12, loc="left")
    drawn = [curve for curve in curves if curve[1]]
    if not drawn:
        axis.text(0.5, 0.5, missing, ha="center", va="center", transform=axis.transAxes, color="0.4")
        axis.set_xticks([])
        axis.set_yticks([])
        return
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(ylabel)
    axis.grid(True, which="major", alpha=0.3)
    for label, steps, values, style in drawn:
        # Markers help when there are few points (a short run, or evaluation every few hundred steps).
        marker = "o" if len(steps) <= 30 else None
        axis.plot(steps, values, style, label=label, marker=marker, markersize=3, linewidth=1.5)
    if log:
        use_log_scale(axis, [v for _, _, values, _ in drawn for v in values])
    else:
        axis.yaxis.set_major_formatter(PLAIN)
    if len(drawn) > 1:
        axis.legend(frameon=False)


def summary_line(state: dict, state_file: Path) -> str:
    # The end-of-training summary (train_loss, train_runtime, ...); absent while a run is still going. Step logs
    # carry a train_runtime too when tokens are counted, so it does not identify the summary.
    final = next((e for e in reversed(state["log_history"]) if "train_loss" in e), {})
    parts = [
        str(state_file.parent),
        f"{state.get('global_step', '?')} steps",
        f"{state.get('epoch', 0):.2f} epochs",
    ]
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    if losses:
        parts.append(f"last loss {losses[-1]:.3g}")
    if final:
        parts.append(f"{final['train_runtime']:.0f} s")
        if "train_samples_per_second" in final:
            parts.append(f"{final['train_samples_per_second']:.3g} samples/s")
    return "   ·   ".join(parts)


def plot(state: dict, state_file: Path, png: Path) -> None:
    history = state["log_history"]
    train_loss, eval_loss = series(history, "loss"), series(history, "eval_loss")
    if not train_loss[0] and not eval_loss[0]:
        sys.exit(
            f"error: {state_file} has no logged loss yet (logging happens every logging_steps steps); "
            "plot again later, or train with a smaller --logging_steps"
        )
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
    (loss_axis, lr_axis), (grad_axis, speed_axis) = axes
    draw_panel(
        loss_axis, "Loss", "loss (assistant tokens)",
        [("train", *train_loss, "-"), ("eval", *eval_loss, "--")],
        "no loss logged", log=True,
    )  # fmt: skip
    draw_panel(
        lr_axis,
        "Learning rate",
        "learning rate",
        [("", *series(history, "learning_rate"), "-")],
        "not logged",
    )
    draw_panel(
        grad_axis, "Gradient norm (before clipping)", "global L2 norm",
        [("", *series(history, "grad_norm"), "-")], "not logged", log=True,
    )  # fmt: skip
    draw_panel(
        speed_axis, "Throughput", "input tokens / s (average since start)",
        [("", *series(history, "train_tokens_per_second"), "-")],
        "throughput not logged:\ntrain with --include_num_input_tokens_seen true",
    )  # fmt: skip
    figure.suptitle(summary_line(state, state_file), fontsize=11)
    figure.savefig(png, dpi=120)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    state_file = find_state_file(args.output_dir)
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as error:
        sys.exit(
            f"error: {state_file} is not valid JSON ({error.msg} at line {error.lineno}); was it cut off?"
        )
    png = args.output or state_file.parent / PNG_NAME
    plot(state, state_file, png)
    print(png)


if __name__ == "__main__":
    main()
