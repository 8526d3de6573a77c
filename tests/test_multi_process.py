"""Loss parity: a tiny recipe trained by one process and by VLM_TEST_NUM_PROCESSES processes at the same global
batch (micro-batch x accumulation x processes) follows the same loss curve. One process accumulates over the
micro-batches that the others compute side by side, on the same seeded sample order, so only the order of the
floating-point sums differs. Runs over gloo on a CPU and, in `make test-gpu`, over NCCL on the GPUs."""

import json

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


@requires_processes(2, "compares one process with several")
# Qwen's parity (two more launches) runs in `make test-extended` and `make test-gpu`.
@pytest.mark.parametrize("recipe", ["llava", pytest.param("qwen_vl", marks=pytest.mark.extended)])
def test_one_and_several_processes_follow_the_same_loss_curve(recipe, tiny_model, demo_data, tmp_path):
    family, yaml = RECIPES[recipe]
    losses = {}
    for processes in (1, NUM_PROCESSES):
        output_dir = tmp_path / f"{processes}-processes"
        args = [
            "--config", yaml, "--model_name_or_path", tiny_model(family),
            "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", output_dir,
            "--max_steps", STEPS, "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", NUM_PROCESSES // processes,  # the same global batch either way
            "--learning_rate", "1e-3", "--logging_steps", 1, "--save_strategy", "no",
            "--bf16", "false", "--fp16", "false",  # fp32, whatever VLM_TEST_PRECISION says (see PARITY_RTOL)
        ]  # fmt: skip
        launch_recipe(f"{recipe}.py", args, num_processes=processes)
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
