"""AdamW for 16-bit weights whose small updates are not rounded away (`--compensated_bf16_updates true`).

A bf16 weight keeps 8 bits of mantissa: a weight of 0.02 moves in steps of 1.2e-4, so an Adam update of 2e-5 (the
learning rate of a fine-tune) rounds to nothing, and plain bf16 AdamW barely trains at such rates. An fp32 master copy
fixes that for 4 more bytes per trained parameter (7B: 28 GB). This optimizer keeps, per weight, a 16-bit
compensation term holding what the last rounding dropped and adds it into the next update (Kahan summation): the
weight plus its compensation carries about 16 bits of mantissa, the update is applied as exactly as fp32 master
weights would apply it, and it costs 2 bytes per trained parameter. The moments stay in the weights' dtype (as torch's
AdamW keeps them); every step's arithmetic is fp32.

Without DeepSpeed only: DeepSpeed makes its own optimizer (and keeps fp32 masters itself). The memory planner counts
the compensation (TrainingSetup.compensated_updates). scripts/update_quality.py compares the loss curves.
"""

import torch


class CompensatedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
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
                step = state["step"]
                grad = weight.grad.float()
                exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                exact = weight.float()
                update = (
                    (exp_avg / (1 - beta1**step)).div_(denominator).add_(exact, alpha=group["weight_decay"])
                )
                exact.add_(update, alpha=-group["lr"])
                compensation = state.get("compensation")
                if compensation is None:
                    weight.copy_(exact)
                    continue
                exact.add_(compensation.float())  # what earlier roundings dropped
                weight.copy_(exact)  # rounded to the weight's 16 bits
                compensation.copy_(
                    exact.sub_(weight.float())
                )  # what this rounding dropped, for the next step
        return loss
