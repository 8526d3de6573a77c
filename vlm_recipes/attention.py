"""Packed (variable-length) attention for vision towers, from PyTorch itself: `--attn_implementation sdpa_varlen`.

Qwen2.5-VL's vision tower attends within windows of 8x8 patches. With `sdpa` transformers runs one attention call
per window (64 per 448x448 image, per layer, forward, recompute and backward) after a host-device sync; with a
flash-attention implementation it runs one packed call per layer. flash-attn is a separate CUDA build that many
machines lack; PyTorch (2.10+) ships the same kind of kernel as `torch.nn.attention.varlen.varlen_attn`. This
module registers it with transformers under VARLEN_ATTENTION (the name contains "flash", which is what makes the
model hand it the packed sequence boundaries) and switches a loaded model's vision tower to it; the language model
keeps sdpa (the model loads with sdpa, loadable_attention; `--attn_implementation sdpa_varlen` in the Qwen-VL
recipe). With `--packing true` the language model's packed rows go through the same function in every recipe
(use_packed_text_attention): the segments are read from the per-sample position_ids, and no block-diagonal mask is
built.

Where the packed kernel cannot run (CPU, fp32, an older PyTorch) the function computes the same thing window by
window with sdpa, exactly like transformers' own fallback, so a config that names it runs anywhere.
"""

import weakref

import torch
from torch.nn import functional as F  # noqa: N812

VARLEN_ATTENTION = "flash_varlen_torch"  # registered name; "flash" routes the packed boundaries to it
PACKED_VISION_ATTENTION = "sdpa_varlen"  # what users write in a YAML / on the command line


def loadable_attention(attn_implementation: str) -> str:
    """The implementation to load a model with: sdpa_varlen is not one transformers knows (it rejects the name at
    load time), so the model loads with sdpa and the recipe switches the packed parts to the varlen kernel after."""
    return "sdpa" if attn_implementation == PACKED_VISION_ATTENTION else attn_implementation


def packed_kernel_available(query: torch.Tensor) -> bool:
    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention_forward(
    module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, is_causal=False, **kwargs
):
    """transformers' attention-function signature: query/key/value are (1, heads, tokens, head_dim), the
    boundaries of the packed sequences come as cu_seq_lens_q/k; returns ((1, tokens, heads, head_dim), None)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and attention_mask is None and kwargs.get("position_ids") is not None:
        # a packed language-model row (--packing true)
        cu_q, longest = packed_segments(kwargs["position_ids"])
        cu_k, kwargs["max_length_q"], kwargs["max_length_k"] = cu_q, longest, longest
    if cu_q is None or attention_mask is not None:
        raise ValueError(
            f"attn_implementation {PACKED_VISION_ATTENTION!r} is for packed vision towers (Qwen-VL) and packed rows "
            "(--packing true); use sdpa for this model"
        )
    causal = bool(is_causal or getattr(module, "is_causal", False))
    batch, heads, length, _ = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves heads // kv_heads queries
        key, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, value))
    # (rows x tokens, heads, head_dim): the rows one after another, each sample a segment of its own
    q, k, v = (t.transpose(1, 2).reshape(batch * t.shape[2], heads, t.shape[3]) for t in (query, key, value))
    if packed_kernel_available(query) and dropout == 0.0:
        from torch.nn.attention.varlen import varlen_attn

        max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max())
        window = (-1, 0) if causal else (-1, -1)
        out = varlen_attn(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, scale=scaling, window_size=window)
        return out.reshape(batch, length, heads, -1), None
    out = attention_segment_by_segment(q, k, v, cu_q, cu_k, scaling, causal, dropout)
    return out.reshape(batch, length, heads, -1), None


def attention_segment_by_segment(q, k, v, cu_q, cu_k, scale=None, causal=False, dropout=0.0) -> torch.Tensor:
    """What varlen_attn computes, window by window with sdpa as transformers does: q/k/v are (tokens, heads,
    head_dim), segment i is rows cu[i]:cu[i+1]; returns (tokens, heads, head_dim)."""
    lengths_q, lengths_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    outputs = [
        F.scaled_dot_product_attention(
            qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), dropout_p=dropout, scale=scale,
            is_causal=causal,
        ).transpose(0, 1)
        for qs, ks, vs in zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k), strict=True)
    ]  # fmt: skip
    return torch.cat(outputs)


def boundaries_of(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths of packed rows, flattened one after another: a segment starts wherever the
    positions restart at 0 (each sample, and a row's trailing padding)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)


_LAST_SEGMENTS = {}  # the last position_ids read (a weak reference), its version, and its (boundaries, longest)


def packed_segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """boundaries_of(position_ids) and the longest segment, read once per batch: every layer of a forward (and of its
    recompute under checkpointing) is handed the same position_ids tensor, and reading them costs two host-device
    syncs, which per layer left the GPU idle between kernels. The weak reference makes a new batch's tensor a miss
    even where it reuses a freed one's memory; the version, one changed in place."""
    last = _LAST_SEGMENTS.get("positions")
    if last is not None and last() is position_ids and _LAST_SEGMENTS["version"] == position_ids._version:
        return _LAST_SEGMENTS["segments"]
    boundaries = boundaries_of(position_ids)
    segments = boundaries, int((boundaries[1:] - boundaries[:-1]).max())
    _LAST_SEGMENTS.update(
        positions=weakref.ref(position_ids), version=position_ids._version, segments=segments
    )
    return segments


def use_packed_text_attention(model) -> None:
    """--packing true with sdpa_varlen: the language model's attention over packed rows as one varlen call per layer,
    the segments read from the per-sample positions, instead of sdpa with the block-diagonal mask transformers builds
    (which on an H200 took cuDNN's masked attention, host-bound: docs/benchmarks.md, "Length mix")."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(
        VARLEN_ATTENTION, flash_attention_mask
    )  # no mask: the positions say it all
    model.config.get_text_config()._attn_implementation_internal = VARLEN_ATTENTION


def use_packed_vision_attention(model, vision_config) -> None:
    """Switch a loaded model's vision tower to the packed kernel; the language model keeps sdpa.

    Set after loading, on the vision config alone: transformers checks a name containing "flash" against the
    flash-attn packages and the kernels hub at load time, and this function is neither.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    vision_config._attn_implementation_internal = VARLEN_ATTENTION
