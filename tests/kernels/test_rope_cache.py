"""The fused GQA row preparation (eaas_kernels.rope_cache: q/k norm, RoPE, K/V cache write) against
its reference and against the model's own torch ops (ops.rms_norm, ops.rope_cos_sin,
ops.apply_rope, PagedKVCache.write), in the CPU interpreter and on CUDA.

Tolerances: the kernel's only arithmetic difference from the reference is the float32 sum order of
the norm's mean of squares, so float32 agrees to a few ulp; bfloat16 rounds five times on the way
and the interpreter truncates float32 -> bfloat16 casts where a GPU rounds to nearest, so 4 ulp
there (2 on CUDA).
"""

from __future__ import annotations

import pytest
import torch

from eaas.model import ops
from eaas_kernels import reference_attention as ref
from eaas_kernels import rope_cache_write
from eaas_kernels.rope_cache import rope_cache_write_triton

from .conftest import HAS_CUDA, cuda_only

DEVICE = "cuda" if HAS_CUDA else "cpu"
NH, NKV, D, SLOTS = 4, 2, 16, 160


def tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    eps = torch.finfo(dtype).eps
    ulps = 2 if HAS_CUDA else 4
    return dict(atol=ulps * eps, rtol=ulps * eps)


def case(t: int, dtype: torch.dtype, seed: int, norm: bool, device: str = DEVICE):
    """q/k/v as views of one fused projection [T, (NH + 2 NKV) D]; positions and slots as
    strided columns of one packed int64 tensor (as the captured decode step passes them)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (NH + 2 * NKV) * D, generator=gen) * 3).to(device, dtype)
    q = qkv[:, :NH * D].view(t, NH, D)
    k = qkv[:, NH * D:(NH + NKV) * D].view(t, NKV, D)
    v = qkv[:, (NH + NKV) * D:].view(t, NKV, D)
    packed = torch.zeros(t, 3, dtype=torch.long)
    packed[:, 0] = torch.randint(0, 500, (t,), generator=gen)
    packed[:, 1] = torch.randperm(SLOTS, generator=gen)[:t]
    packed = packed.to(device)
    inv_freq, factor = ops.rope_inv_freq(D, 10000.0, None, 512)
    table = ops.rope_table(inv_freq, factor, 512, dtype, device)
    qn = kn = None
    if norm:
        qn = (1 + 0.1 * torch.randn(D, generator=gen)).to(device, dtype)
        kn = (1 + 0.1 * torch.randn(D, generator=gen)).to(device, dtype)
    caches = [torch.full((SLOTS, NKV, D), 7.0, dtype=dtype, device=device) for _ in range(2)]
    return q, k, v, packed[:, 0], packed[:, 1], table, qn, kn, caches


def run(fn, args, eps=1e-6):
    q, k, v, pos, slots, table, qn, kn, (kc, vc) = args
    kc, vc = kc.clone(), vc.clone()
    out = fn(q, k, v, pos, slots, table, qn, kn, eps, kc, vc)
    return out, kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("t", [1, 7])
def test_kernel_equals_reference(dtype, norm, t):
    args = case(t, dtype, seed=t + 10 * norm, norm=norm)
    got, gk, gv = run(rope_cache_write_triton, args)
    want, wk, wv = run(ref.rope_cache_write_ref, args)
    torch.testing.assert_close(got, want, **tol(dtype))
    torch.testing.assert_close(gk, wk, **tol(dtype))
    assert torch.equal(gv, wv)  # v is copied, not computed
    slots = args[4]
    untouched = torch.ones(SLOTS, dtype=torch.bool, device=gk.device)
    untouched[slots] = False
    assert bool((gk[untouched] == 7.0).all()) and bool((gv[untouched] == 7.0).all())


@pytest.mark.parametrize("norm", [False, True])
def test_reference_is_the_models_torch_path(norm):
    """The reference is what GQAAttention's CPU path computes with ops.* and cache.write, bit for
    bit (so the fused CUDA path reproduces the model, not a look-alike)."""
    q, k, v, pos, slots, table, qn, kn, (kc, vc) = case(5, torch.bfloat16, 3, norm, "cpu")
    want, wk, wv = run(ref.rope_cache_write_ref, (q, k, v, pos, slots, table, qn, kn, (kc, vc)))
    inv_freq, factor = ops.rope_inv_freq(D, 10000.0, None, 512)
    qq, kk = (ops.rms_norm(q, qn, 1e-6), ops.rms_norm(k, kn, 1e-6)) if norm else (q, k)
    cos, sin = ops.rope_cos_sin(pos, inv_freq, factor, torch.bfloat16)
    assert torch.equal(want, ops.apply_rope(qq, cos, sin))
    k2 = kc.clone()
    k2.index_copy_(0, slots, ops.apply_rope(kk, cos, sin))
    assert torch.equal(wk, k2)


def test_dispatch_runs_the_reference_on_cpu():
    args = case(3, torch.float32, 1, True, "cpu")
    got, gk, _ = run(rope_cache_write, args)
    want, wk, _ = run(ref.rope_cache_write_ref, args)
    assert torch.equal(got, want) and torch.equal(gk, wk)


def test_bad_arguments_are_named():
    q, k, v, pos, slots, table, qn, kn, (kc, vc) = case(2, torch.float32, 0, True, "cpu")
    with pytest.raises(TypeError, match="positions must be int64"):
        ref.rope_cache_write_ref(q, k, v, pos.int(), slots, table, qn, kn, 1e-6, kc, vc)
    with pytest.raises(ValueError, match="both be given"):
        ref.rope_cache_write_ref(q, k, v, pos, slots, table, qn, None, 1e-6, kc, vc)
    with pytest.raises(ValueError, match="caches must be"):
        ref.rope_cache_write_ref(q, k, v, pos, slots, table, qn, kn, 1e-6, kc[:, :1], vc)
    with pytest.raises(ValueError, match="table must be"):
        ref.rope_cache_write_ref(q, k, v, pos, slots, table[:, :1], qn, kn, 1e-6, kc, vc)


@cuda_only
def test_rows_are_batch_invariant_on_cuda():
    """A row prepared alone equals the same row inside a batch of 130, bitwise."""
    args = case(130, torch.bfloat16, 5, True)
    q, k, v, pos, slots, table, qn, kn, caches = args
    full, fk, _ = run(rope_cache_write_triton, args)
    for i in (0, 77, 129):
        one = (q[i:i + 1], k[i:i + 1], v[i:i + 1], pos[i:i + 1], slots[i:i + 1], table, qn, kn,
               caches)
        alone, ak, _ = run(rope_cache_write_triton, one)
        assert torch.equal(alone[0], full[i]) and torch.equal(ak[slots[i]], fk[slots[i]])
