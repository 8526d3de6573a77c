"""Loss parity: a tiny recipe trained by one process and by VLM_TEST_NUM_PROCESSES processes at the same global
batch (micro-batch x accumulation x processes) follows the same loss curve. One process accumulates over the
micro-batches that the others compute side by side, on the same seeded sample order, so only the order of the
floating-point sums differs. Runs over gloo on a CPU and, in `make test-gpu`, over NCCL on the GPUs."""

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import (
    NUM_PROCESSES,
    assert_resolved_like_arguments,
    launch_recipe,
    logged_losses,
    requires_processes,
)

pytestmark = [pytest.mark.distributed, pytest.mark.gpu_e2e]

# Per-step losses, relative. Measured on a CPU in fp32 (2 processes): identical to 8e-8. A global batch off by a
# factor of two (the same run with accumulation 1) differs by 0.05% to 3% per step, so the tolerance tells the
# two apart. Both runs train in fp32 also under `make test-gpu`, so that the same bound applies there: in 16 bits
# the gradients reduced across GPUs round differently from those accumulated in one process, and a bound wide
# enough for that would let through part of such a mistake. (The other gpu_e2e tests run the 16-bit path.)
PARITY_RTOL = 1e-4
STEPS = 5

RECIPES = {
    "llava": ("llava", "recipes/configs/llava_demo.yaml"),
    "qwen_vl": ("qwen2.5-vl", "recipes/configs/qwen_vl_demo.yaml"),
}


def with_two_bad_records(demo_data, root) -> Path:
    """The demo training data with two records whose images do not decode, at positions 1 and 2 (with 2
    processes, one in each process's share of the preflight), under a copy of its image folder."""
    shutil.copytree(demo_data / "images", root / "images")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    records = json.loads((demo_data / "train.json").read_text())
    for position, name in ((1, "broken-1"), (2, "broken-2")):
        records.insert(position, {**records[0], "id": name, "image": "images/broken.png"})
    (root / "train.json").write_text(json.dumps(records))
    return root


@requires_processes(2, "compares one process with several")
# In `make test` LLaVA's parity runs with group_by_length (lengths from the preflight, the order drawn alike on every
# process): it checks the parity and the shared-out preflight as the default shuffle would, and the grouping too.
# The default shuffle's and Qwen's parity run in `make test-extended` and `make test-gpu`.
@pytest.mark.parametrize(
    "recipe, sampling",
    [
        pytest.param("llava", "random", marks=pytest.mark.extended),
        ("llava", "group_by_length"),
        pytest.param("qwen_vl", "random", marks=pytest.mark.extended),
    ],
)
def test_one_and_several_processes_follow_the_same_loss_curve(
    recipe, sampling, tiny_model, demo_data, tmp_path
):
    """Also `--skip_bad_records true` under several processes: if the processes kept different records, their
    samples (and so the losses) would differ from the one process's. With group_by_length (the preflight's lengths,
    training.RecipeTrainer), the same: every process draws the same length-grouped order, of which each trains its
    share, so each sample is trained once and the steps match the one process's."""
    family, yaml = RECIPES[recipe]
    data = with_two_bad_records(demo_data, tmp_path / "data")
    losses = {}
    for processes in (1, NUM_PROCESSES):
        output_dir = tmp_path / f"{processes}-processes"
        args = [
            "--config", yaml, "--model_name_or_path", tiny_model(family), "--skip_bad_records", "true",
            "--dataset_path", data / "train.json", "--image_root", data, "--output_dir", output_dir,
            "--max_steps", STEPS, "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", NUM_PROCESSES // processes,  # the same global batch either way
            "--learning_rate", "1e-3", "--logging_steps", 1, "--save_strategy", "no",
            "--bf16", "false", "--fp16", "false",  # fp32, whatever VLM_TEST_PRECISION says (see PARITY_RTOL)
            "--train_sampling_strategy", sampling,
        ]  # fmt: skip
        result = launch_recipe(f"{recipe}.py", args, num_processes=processes)
        skipped = [line for line in result.stdout.splitlines() if line.startswith("preflight: skipping")]
        # listed once, by process 0, with the records each process checked when there are several
        expected = f"preflight: skipping 2 of 98 records of {data / 'train.json'}"
        assert len(skipped) == 1 and skipped[0].startswith(expected), skipped
        losses[processes] = logged_losses(output_dir)
        # DeepSpeed's "auto" values follow the world size of each run (one process included)
        assert_resolved_like_arguments(
            json.loads((output_dir / "ds_config_resolved.json").read_text()), world_size=processes, micro=2,
            accumulation=NUM_PROCESSES // processes, learning_rate=1e-3,
        )  # fmt: skip
    one, several = losses[1], losses[NUM_PROCESSES]
    assert sorted(one) == sorted(several) == list(range(1, STEPS + 1))
    assert one[STEPS] < one[1]  # it trained: the comparison is not between two untouched models
    differences = {step: abs(several[step] - one[step]) / abs(one[step]) for step in one}
    assert max(differences.values()) <= PARITY_RTOL, (
        f"1 process: {one}\n{NUM_PROCESSES} processes: {several}\nrelative differences: {differences}"
    )
