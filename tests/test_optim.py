"""--compensated_bf16_updates: AdamW on bf16 weights whose updates land as with fp32 master weights, where plain
bf16 AdamW rounds small ones away; how the recipes and the planner take it."""

import json
import sys

import pytest
import torch

from tests.conftest import REPO, run_command
from vlm_recipes.config import parse_recipe_args
from vlm_recipes.memory import Hardware, TrainingSetup, caveat, estimate, load_model_config, model_shape
from vlm_recipes.optim import CompensatedAdamW


def test_bf16_weights_plus_their_compensation_follow_fp32_adamw_where_plain_bf16_does_not():
    torch.manual_seed(0)
    start = (torch.randn(4096) * 0.02).to(torch.bfloat16)  # weights of a transformers-initialised model
    reference = torch.nn.Parameter(start.float())  # fp32 AdamW from the same starting point
    compensated = torch.nn.Parameter(start.clone())
    plain = torch.nn.Parameter(start.clone())
    optimizers = [
        torch.optim.AdamW([reference], lr=2e-5, weight_decay=0.01),
        CompensatedAdamW([compensated], lr=2e-5, weight_decay=0.01),
        torch.optim.AdamW([plain], lr=2e-5, weight_decay=0.01),
    ]
    for _ in range(200):
        # a consistent direction, as a loss gives, with noise; in bf16 for all three, as a bf16 model's gradients are
        grad = (torch.randn(4096) + 0.5).to(torch.bfloat16)
        for weight, optimizer in zip((reference, compensated, plain), optimizers, strict=True):
            weight.grad = grad.to(weight.dtype)
            optimizer.step()
    exact = reference.detach()
    travelled = (exact - start.float()).abs().mean()
    assert travelled > 50 * 2e-5  # the fp32 weights moved a long way: 200 steps of up to 2e-5
    # Weight + compensation is the fp32 weight, up to what bf16 moments change in the updates (well under 1%)...
    carried = compensated.detach().float() + optimizers[1].state[compensated]["compensation"].float()
    assert (carried - exact).abs().mean() < 0.01 * travelled
    assert (carried - exact).abs().max() < 0.05 * travelled
    # ...the bf16 weight alone is that rounded to bf16, and plain bf16 AdamW lost most of the way.
    assert torch.allclose(compensated.detach().float(), carried, rtol=2**-8, atol=0)
    plain_travelled = (plain.detach().float() - start.float()).abs().mean()
    assert plain_travelled < 0.5 * travelled, (plain_travelled, travelled)


DEMO_CONFIG = REPO / "recipes" / "configs" / "llava_demo.yaml"


def test_the_recipes_take_it_without_deepspeed_only(tmp_path):
    # Refused in a process of its own: a DeepSpeed config's arguments set up a process group in the process that
    # parses them, which would hold its port for the rest of this test session.
    refused = run_command(
        [sys.executable, "recipes/llava.py", "--config", DEMO_CONFIG, "--output_dir", tmp_path / "out",
         "--compensated_bf16_updates", "true"],
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "DeepSpeed makes its own" in refused.stderr, refused.stderr[-2000:]
    *_, training_args = parse_recipe_args(
        DEMO_CONFIG,
        ["--output_dir", str(tmp_path), "--compensated_bf16_updates", "true", "--deepspeed", "none"],
    )
    assert training_args.compensated_bf16_updates and not training_args.deepspeed


def test_the_recipe_trainer_builds_it_with_the_trainers_weight_decay_groups(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments

    from vlm_recipes.training import RecipeTrainer

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, learning_rate=3e-5, report_to=[],
                             use_cpu=True)  # fmt: skip
    args.compensated_bf16_updates = True
    optimizer = RecipeTrainer(model=model, args=args).create_optimizer()
    assert isinstance(optimizer, CompensatedAdamW)
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 0.1] and all(group["lr"] == 3e-5 for group in optimizer.param_groups)
    norms = [p for group in optimizer.param_groups if group["weight_decay"] == 0.0 for p in group["params"]]
    assert norms and all(p.ndim == 1 for p in norms)  # norms (and biases) are not decayed


def test_the_planner_counts_two_bytes_more_per_trained_weight_and_drops_the_rounding_caveat():
    shape = model_shape(*load_model_config("llava-1.5-7b"))
    plain = TrainingSetup.from_mode("full", micro_batch=4, seq_len=1024)
    compensated = TrainingSetup.from_mode("full", micro_batch=4, seq_len=1024, compensated_updates=True)
    hardware = Hardware(gpus_per_node=1, gpu_memory_gib=139, host_ram_gib=125)
    before, after = (estimate("single_gpu", shape, s, hardware) for s in (plain, compensated))
    assert after.gpu["compensation of the bf16 updates"] == pytest.approx(
        (before.gpu["trainable weights, gradients, Adam (bf16)"]) / 4
    )
    assert (
        "rounded away" in caveat("single_gpu", shape, plain)
        and caveat("single_gpu", shape, compensated) == ""
    )


@pytest.mark.extended  # three short trainings on the CPU, ~1 min: `make test-extended`
def test_update_quality_curves_compensated_bf16_on_fp32_plain_bf16_stalls(tmp_path):
    out = run_command(
        [sys.executable, "scripts/update_quality.py", "--steps", "120", "--out", tmp_path]
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    final, start = summary["final_loss"], summary["start_loss"]
    fp32_drop = start - final["fp32 AdamW"]
    assert fp32_drop > 0.1
    assert abs(final["bf16 compensated AdamW"] - final["fp32 AdamW"]) < 0.02 * fp32_drop
    assert start - final["bf16 AdamW"] < 0.5 * fp32_drop
    assert (tmp_path / "curves.png").is_file()


def test_the_fused_step_equals_the_op_by_op_one_and_compiles_once_for_every_shape_and_step():
    # What runs on a GPU (one compiled kernel per tensor), compiled here for the CPU: the same weights, moments and
    # compensations as the op-by-op step, tensors of several shapes and a learning rate that changes every step.
    torch._dynamo.reset()
    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (7, 5, 3), (1000,)]
    starts = [(torch.randn(shape) * 0.02).to(torch.bfloat16) for shape in shapes]
    fused = [torch.nn.Parameter(start.clone()) for start in starts]
    eager = [torch.nn.Parameter(start.clone()) for start in starts]
    optimizers = [CompensatedAdamW(weights, lr=2e-5, weight_decay=0.01, fused=flag)
                  for weights, flag in ((fused, True), (eager, False))]  # fmt: skip
    for step in range(6):
        grads = [torch.randn(shape).to(torch.bfloat16) for shape in shapes]
        for weights, optimizer in zip((fused, eager), optimizers, strict=True):
            for weight, grad in zip(weights, grads, strict=True):
                weight.grad = grad.clone()
            for group in optimizer.param_groups:
                group["lr"] = 2e-5 * (1 + step)  # as a warm-up schedule changes it
            optimizer.step()
    for a, b in zip(fused, eager, strict=True):
        state_a, state_b = optimizers[0].state[a], optimizers[1].state[b]
        carried_a = a.detach().float() + state_a["compensation"].float()
        carried_b = b.detach().float() + state_b["compensation"].float()
        # The same fp32 arithmetic, but a compiler may fuse a multiply-add (which instructions depends on the CPU),
        # and a last-bit difference can flip the rounding of the bf16 compensation by one of its own ulps: at most
        # 2**-8 of a compensation that is at most half a bf16 ulp of the weight (2**-9), so 2**-17 of the weight.
        # A wrong step is off by about the learning rate (2e-5 of a 0.02 weight: 1e-3). Such flips stay rare.
        torch.testing.assert_close(carried_a, carried_b, rtol=2**-16, atol=1e-9)
        flipped = ((carried_a - carried_b).abs() > 1e-6 * carried_b.abs() + 1e-9).float().mean()
        assert flipped <= 0.01, f"{flipped:.2%} of the weights differ beyond fp32 rounding"
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state_a[name], state_b[name], rtol=2**-7, atol=0)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # not one per shape or per step (at most one more when dynamic shapes set in)
    assert 1 <= frames <= 2, frames


def test_the_device_check_of_the_optimizer_step_runs_on_a_cpu_and_finds_the_fused_step_equal():
    # scripts/device/optimizer_step_check.py times the optimizers on a GPU at real size; here, the tiny shapes
    result = run_command([sys.executable, REPO / "scripts" / "device" / "optimizer_step_check.py", "--tiny"])
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows[0]["fused_vs_op_by_op_max_relative"] <= 1e-5, rows[0]
    timed = {row["optimizer"]: row for row in rows[1:]}
    assert set(timed) == {
        "torch AdamW, bf16 moments",
        "CompensatedAdamW, op by op",
        "CompensatedAdamW, fused",
    }
    assert all(row["ms_per_step"] > 0 and row["trained_weights"] > 1e6 for row in timed.values()), timed
