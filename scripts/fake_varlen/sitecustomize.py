"""A CPU stand-in for the GPU's varlen attention kernel, to see torch.compile's recompiles as a GPU run would.

On the CPU `--attn_implementation sdpa_varlen` takes its window-by-window fallback (vlm_recipes/attention.py), a
Python loop over the segments that torch.compile specialises on their count; on a GPU it is one opaque
`varlen_attn` call. Put this folder first on PYTHONPATH with FAKE_VARLEN=1 and every process takes the GPU's path:
`varlen_attn` becomes a custom op (its own forward and backward, per segment, in fp32) that dynamo does not look
into. An experiment, not part of the recipes (docs/benchmarks.md, "Compiled and packed"):

    PYTHONPATH=scripts/fake_varlen:. FAKE_VARLEN=1 TORCH_LOGS=recompiles python scripts/benchmark.py run --tiny \
        --model qwen2.5-vl-3b --configs single_gpu --length_mix --seq_len 2048 --batching packed --micro_batch 4 \
        --packed_micro_batch 2 --attn_implementation sdpa_varlen --no_gradient_checkpointing \
        --recipe_args "--torch_compile true" --steps 8    # then: grep -c Recompiling <the run's log.txt>
"""

import os

if os.environ.get("FAKE_VARLEN"):
    import torch
    import torch.nn.attention.varlen as varlen_module

    import vlm_recipes.attention as attention

    @torch.library.custom_op("fake::varlen", mutates_args=())
    def fake_varlen(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        scale: float,
        causal: bool,
    ) -> torch.Tensor:
        return attention.attention_segment_by_segment(
            q, k, v, cu_q, cu_k, None if scale < 0 else scale, causal
        )

    @fake_varlen.register_fake
    def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        return torch.empty_like(q)

    def _setup(ctx, inputs, output):
        q, k, v, cu_q, cu_k, _, _, scale, causal = inputs
        ctx.save_for_backward(q, k, v, cu_q, cu_k)
        ctx.scale, ctx.causal = scale, causal

    @torch.library.custom_op("fake::varlen_bwd", mutates_args=())
    def fake_varlen_bwd(
        grad: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        scale: float,
        causal: bool,
    ) -> list[torch.Tensor]:
        lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        gqs, gks, gvs = [], [], []
        for g, qs, ks, vs in zip(grad.split(lq), q.split(lq), k.split(lk), v.split(lk), strict=True):
            g, qs, ks, vs = (t.transpose(0, 1).float() for t in (g, qs, ks, vs))  # (heads, length, dim)
            sc = (qs.shape[-1] ** -0.5) if scale < 0 else scale
            scores = qs @ ks.transpose(-1, -2) * sc
            if causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            p = scores.softmax(-1)
            gvs.append((p.transpose(-1, -2) @ g).transpose(0, 1).to(v.dtype))
            dp = g @ vs.transpose(-1, -2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            gqs.append((ds @ ks * sc).transpose(0, 1).to(q.dtype))
            gks.append((ds.transpose(-1, -2) @ qs * sc).transpose(0, 1).to(k.dtype))
        return [torch.cat(gqs), torch.cat(gks), torch.cat(gvs)]

    @fake_varlen_bwd.register_fake
    def _(grad, q, k, v, cu_q, cu_k, scale, causal):
        return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]

    def _backward(ctx, grad):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        gq, gk, gv = fake_varlen_bwd(grad, q, k, v, cu_q, cu_k, ctx.scale, ctx.causal)
        return gq, gk, gv, None, None, None, None, None, None

    fake_varlen.register_autograd(_backward, setup_context=_setup)

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
        return fake_varlen(
            q,
            k,
            v,
            cu_q,
            cu_k,
            int(max_q),
            int(max_k),
            -1.0 if scale is None else float(scale),
            tuple(window_size) == (-1, 0),
        )

    varlen_module.varlen_attn = varlen_attn
    attention.packed_kernel_available = lambda query: True
