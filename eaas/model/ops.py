"""Elementary ops shared by every architecture: linear (optionally batch-invariant), RMSNorm,
RoPE."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "upload",
    "apply_rope",
    "linear",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
    "rope_table",
    "rowwise",
    "silu_mul",
]


def upload(values: Any, device: torch.device | str, dtype: torch.dtype = torch.long
           ) -> torch.Tensor:
    """A small host list or tensor on `device`, without waiting for the GPU.

    `torch.tensor(values, device="cuda")` and `.to("cuda")` copy from pageable memory, and CUDA
    synchronises the stream before such a copy: the caller (the asyncio loop) would wait for all
    the work already queued. From pinned memory with non_blocking=True the copy is just queued.
    """
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """y = x @ w.T (+ bias).

    x: [N, I] rows (CUDA: [..., I]); w: [O, I]; bias: [O] or None. Returns [N, O] in x's dtype.
    batch_invariant=True makes a row's result bitwise the same whatever other rows share the
    call. On CUDA: the Triton matmul of `eaas_kernels.invariant` (tiles and split-K fixed by
    w's shape and dtype, never by N; CUDA-graph capturable). Elsewhere: each row alone (a
    [1, I] x [I, O] product, bias included), every row the same kernel on the same shape.
    """
    if not batch_invariant:
        return torch.nn.functional.linear(x, w, bias)
    if x.is_cuda:
        from eaas_kernels.invariant import matmul

        with torch.cuda.device(x.device):  # Triton launches on the current device
            y = matmul(x.reshape(-1, x.shape[-1]), w, bias)  # [rows, O]
        return y.view(*x.shape[:-1], w.shape[0])
    return rowwise(lambda row: torch.nn.functional.linear(row, w, bias), x)


def rowwise(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """Apply `fn` to each row x[i:i+1] alone and concatenate (tuples of outputs are concatenated
    element-wise). Every call has the same shape, so each row's bits are independent of the batch:
    even element-wise kernels (silu, sigmoid, exp) take vector or scalar paths by position in the
    flattened tensor, so batching can change a row's last bits unless it is computed alone."""
    outs = [fn(x[i : i + 1]) for i in range(x.shape[0])]
    if not outs:
        return fn(x)
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, batch_invariant: bool = False
) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in float32 (as transformers computes it).

    x: [..., D]; weight: [D]. Returns x's shape in the promoted dtype of weight and x.
    On CUDA always the Triton kernel of `eaas_kernels.invariant` (one program per row: one launch
    instead of torch's ~6, and each row's bits independent of the other rows). Elsewhere torch's
    ops, row by row (`rowwise`) when batch_invariant.
    """
    if batch_invariant or x.is_cuda:
        rows = x.reshape(-1, x.shape[-1])  # [R, D]
        if x.is_cuda:
            from eaas_kernels.invariant import rms_norm as rms_norm_triton

            with torch.cuda.device(x.device):
                y = rms_norm_triton(rows, weight, eps)
        else:
            y = rowwise(lambda row: rms_norm(row, weight, eps), rows)
        return y.view(x.shape)
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(
    dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] (float32) and the cos/sin attention factor.

    scaling: None (plain RoPE), {"rope_type": "linear", "factor"} or the YaRN dict
    {"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "attention_factor"} (same formulas as transformers).
    """
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    inv_freq = 1.0 / base
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    # yarn
    orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / orig
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, dim] (the halves repeated, `cat(freqs, freqs)`), computed in float32."""
    freqs = (
        positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    )  # [T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def rope_table(inv_freq: torch.Tensor, attention_factor: float, max_positions: int,
               dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The (cos, sin) rows of positions 0..max_positions-1: [P, 2, dim/2] in `dtype`, the very
    values `rope_cos_sin` gives (its halves are repeated, so one half is kept), for kernels that
    look a row's position up instead of recomputing it (`eaas_kernels.rope_cache_write`)."""
    pos = torch.arange(max_positions, device=device)
    cos, sin = rope_cos_sin(pos, inv_freq.to(device), attention_factor, dtype)  # [P, dim]
    half = cos.shape[-1] // 2
    return torch.stack([cos[:, :half], sin[:, :half]], dim=1).contiguous()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False
) -> torch.Tensor:
    """Rotate x: [T, n, dim] by cos/sin: [T, dim].

    interleave=False: halves layout (rotate_half). interleave=True: DeepSeek's pairs (x0, x1), ...
    rotated by one frequency each and written back de-interleaved, as transformers does.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    if interleave:
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    d = x.shape[-1] // 2
    rotated = torch.cat((-x[..., d:], x[..., :d]), dim=-1)
    return x * cos + rotated * sin
