"""On a GPU: the packed vision attention (sdpa_varlen) against transformers' window-by-window sdpa, on a real-size
Qwen2.5-VL vision tower in bf16: largest difference of the outputs and the input gradients, and the time of a
forward + backward for 4 images of 448x448.

    python scripts/device/vision_attention_check.py
"""

import copy
import time

import torch
from transformers import AutoModelForImageTextToText

from vlm_recipes.attention import use_packed_vision_attention
from vlm_recipes.known_models import KNOWN_MODELS

config = KNOWN_MODELS["qwen2.5-vl-3b"].config()
with torch.device("cuda"):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
sdpa_tower = model.model.visual
packed_model = copy.deepcopy(model)
use_packed_vision_attention(packed_model, packed_model.config.vision_config)
packed_tower = packed_model.model.visual
grid = torch.tensor([[1, 32, 32]] * 4, device="cuda")
pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16)


def run(tower):
    x = pixels.clone().requires_grad_(True)
    out = tower(x, grid_thw=grid).pooler_output
    out.float().square().mean().backward()
    return out.detach(), x.grad


def timed(tower, repeats=5):
    run(tower)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run(tower)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


(a, ga), (b, gb) = run(sdpa_tower), run(packed_tower)
print(
    f"output max |diff| {(a - b).abs().max().item():.3e} (output max {a.abs().max().item():.2f}); "
    f"input-grad max |diff| {(ga - gb).abs().max().item():.3e} (grad max {ga.abs().max().item():.3e})"
)
print(
    f"vision tower fwd+bwd, 4 x 448x448: sdpa {timed(sdpa_tower) * 1e3:.1f} ms, "
    f"sdpa_varlen {timed(packed_tower) * 1e3:.1f} ms"
)
