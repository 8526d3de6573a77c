"""On a GPU: bf16 Linear forward+backward throughput for the widths of Qwen2.5-VL's vision MLP (3,420, not a
multiple of 8) against aligned ones, and two language-model shapes (docs/benchmarks.md, item 6).

    python scripts/device/gemm_alignment_check.py

Each shape: 3 warm-up passes, then the mean of 20 timed with CUDA events. On the H100 the first shape measured
(n=3420) once took 161 ms, which looks like one-off cuBLAS set-up rather than the kernel; docs/benchmarks.md
quotes only the other rows.
"""

import torch


def bench(m: int, k: int, n: int, bias: bool) -> None:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    linear = torch.nn.Linear(k, n, bias=bias, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        linear(x).sum().backward()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y = linear(x)
        y.backward(torch.ones_like(y))
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 20
    print(
        f"m={m} k={k} n={n} bias={bias}: fwd+bwd {ms:.3f} ms, {6 * m * k * n / ms / 1e9:.0f} TFLOPS",
        flush=True,
    )


if __name__ == "__main__":
    for n in (3420, 3424, 3456):  # vision MLP up/gate projections: 1280 -> 3420
        bench(8192, 1280, n, True)
    for k in (3420, 3424):  # vision MLP down projection
        bench(8192, k, 1280, True)
    bench(4096, 2048, 11008, False)  # language MLP
    bench(4096, 2048, 2048, True)  # language q projection (with bias)
