"""AdamW for 16-bit weights whose small updates are not rounded away (`--compensated_bf16_updates true`).

A bf16 weight keeps 8 bits of mantissa: a weight of 0.02 moves in steps of 1.2e-4, so an Adam update of 2e-5 (the
learning rate of a fine-tune) rounds to nothing, and plain bf16 AdamW barely trains at such rates. An fp32 master copy
fixes that for 4 more bytes per trained parameter (7B: 28 GB). This optimizer keeps, per weight, a 16-bit
compensation term holding what the last rounding dropped and adds it into the next update (Kahan summation): the
weight plus its compensation carries about 16 bits of mantissa, the update is applied as exactly as fp32 master
weights would apply it, and it costs 2 bytes per trained parameter. The moments stay in the weights' dtype (as torch's
AdamW keeps them); every step's arithmetic is fp32.

On a GPU each tensor's step is one fused kernel (the update function compiled once by torch.compile, shapes
dynamic): it reads the weight, gradient, moments and compensation once and writes them once, about 18 bytes per
bf16 weight, where the same arithmetic run op by op makes ~15 passes through fp32 temporaries (on one H200:
LLaVA-1.5-7B's step in 116 ms fused against 610 op by op and 37 for torch's fused AdamW,
scripts/device/optimizer_step_check.py). Elsewhere, and for fp32 weights, it runs op by op (`fused=False`).

Without DeepSpeed only: DeepSpeed makes its own optimizer (and keeps fp32 masters itself). The memory planner counts
the compensation (TrainingSetup.compensated_updates). scripts/update_quality.py compares the loss curves.
"""

import torch


def compensated_adamw_update(weight, grad, exp_avg, exp_avg_sq, compensation, scalars):
    """One AdamW step of one tensor, in place, fp32 arithmetic: the moments are updated and stored in their dtype,
    the update is added to the weight plus the compensation of earlier roundings, the sum is rounded to the weight's
    dtype, and what that rounding dropped becomes the new compensation (None for fp32 weights: nothing to keep).
    `scalars` holds lr, beta1, beta2, eps, weight_decay and the two bias corrections, as one fp32 tensor so that a
    compiled version serves every step."""
    lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2 = scalars.unbind()
    grad = grad.float()
    avg = exp_avg.float() * beta1 + grad * (1 - beta1)
    avg_sq = exp_avg_sq.float() * beta2 + grad * grad * (1 - beta2)
    exp_avg.copy_(avg)
    exp_avg_sq.copy_(avg_sq)
    exact = weight.float()
    update = (avg / bias_correction1) / ((avg_sq / bias_correction2).sqrt() + eps) + exact * weight_decay
    exact = exact - lr * update
    if compensation is None:
        weight.copy_(exact)
        return
    exact = exact + compensation.float()  # what earlier roundings dropped
    weight.copy_(exact)  # rounded to the weight's 16 bits
    compensation.copy_(exact - weight.float())  # what this rounding dropped, for the next step


_fused_update = None  # compensated_adamw_update compiled, made on first use


def fused_update():
    global _fused_update
    if _fused_update is None:
        # emulate_precision_casts: without it inductor keeps the fp32 value where the code rounds it to the weight's
        # dtype and reads it back, so every compensation came out 0 (found by the test against the op-by-op step)
        _fused_update = torch.compile(
            compensated_adamw_update, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
        )
    return _fused_update


class CompensatedAdamW(torch.optim.Optimizer):
    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused: bool | None = None
    ):
        """fused: one compiled kernel per tensor; None (the default) where the weights are on a GPU."""
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            scalars = {}  # (step, device) -> the step's scalars, one small host-to-device copy each
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                state = self.state[weight]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(weight)
                    state["exp_avg_sq"] = torch.zeros_like(weight)
                    if (
                        weight.dtype != torch.float32
                    ):  # fp32 weights (LoRA adapters) round nothing that matters
                        state["compensation"] = torch.zeros_like(weight)
                state["step"] += 1
                key = (state["step"], weight.device)
                if key not in scalars:
                    values = [group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                              1 - beta1 ** state["step"], 1 - beta2 ** state["step"]]  # fmt: skip
                    scalars[key] = torch.tensor(values, dtype=torch.float32, device=weight.device)
                tensors = [
                    weight,
                    weight.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state.get("compensation"),
                ]
                fused = weight.is_cuda if self.fused is None else self.fused
                if fused and tensors[-1] is not None and all(t.is_contiguous() for t in tensors):
                    fused_update()(*(t.view(-1) for t in tensors), scalars[key])
                else:
                    compensated_adamw_update(*tensors, scalars[key])
        return loss
