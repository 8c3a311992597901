"""Batch-invariant matmul and RMSNorm (eaas_kernels.invariant) vs their references, and the
invariance itself: a row computed alone is bitwise the same row inside M = 33 and M = 130.

Tolerances against the references. matmul: float32 sums float32 products in another order than
torch (1e-4 at O(1) outputs); float16/bfloat16 round that float32 sum once, and two float32 sums
a hair apart can round one ulp apart, so 2 ulp (rtol = 2 * eps of the dtype); the CPU
interpreter also truncates float32 -> bfloat16 casts where a GPU rounds to nearest. rms_norm
is not bitwise: the sum of squares runs in another order (Triton's tree vs torch's) and rsqrt
may differ in the last bit, so float32 gets 1e-6 (a few ulp) and half dtypes 1 ulp (2 in the
interpreter for bfloat16, truncated twice).
"""

from __future__ import annotations

import pytest
import torch

from eaas_kernels import reference as ref
from eaas_kernels.invariant import MatmulConfig, matmul, matmul_config, rms_norm

from .conftest import cuda_only, interpreter_only

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N_ODD, K_ODD = 40, 72  # neither a multiple of the 16/32 test tiles
SMALL = MatmulConfig(block_m=16, block_n=16, block_k=32, split_k=1, num_warps=1, num_stages=1)
SPLIT3 = MatmulConfig(block_m=16, block_n=16, block_k=32, split_k=3, num_warps=1, num_stages=1)
# positions of 3 target rows inside each batch: different places within a BLOCK_M tile
PLACES = {33: [0, 17, 32], 130: [5, 66, 129]}


def matmul_tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(atol=1e-4, rtol=1e-4)
    eps = torch.finfo(dtype).eps
    return dict(atol=2 * eps, rtol=2 * eps)


def norm_tol(dtype: torch.dtype, interpreted: bool) -> dict:
    if dtype == torch.float32:
        return dict(atol=1e-6, rtol=1e-6)
    ulps = 2 if interpreted and dtype == torch.bfloat16 else 1
    eps = torch.finfo(dtype).eps
    return dict(atol=ulps * eps, rtol=ulps * eps)


def linear_args(m, n, k, dtype, seed, device="cpu", bias=True):
    """x [M, K], w [N, K] scaled so y is O(1), bias [N] or None."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return x, w, b


def assert_rows_invariant(fn, rows: torch.Tensor, seed: int) -> None:
    """fn(rows[i:i+1]) equals fn(batch)[place] bitwise, batches of M = 33 and 130 with random
    neighbours 100x larger (so neighbours would show if they leaked into a target row)."""
    gen = torch.Generator().manual_seed(seed)
    alone = torch.cat([fn(rows[i : i + 1]) for i in range(rows.shape[0])])
    for m, places in PLACES.items():
        batch = (torch.randn(m, rows.shape[1], generator=gen) * 100).to(rows.device, rows.dtype)
        batch[places] = rows
        got = fn(batch)[places]
        assert torch.equal(got, alone), f"rows differ at M={m}"


# --- config rule (pure Python) ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "k", "split"),
    [(2048, 4096, 8), (4096, 2048, 4), (128, 2048, 8), (151936, 2048, 1), (40, 72, 1),
     (40, 600, 2), (768, 2048, 8), (2048, 768, 3)],
)
def test_matmul_config_splits_k_for_few_column_tiles(n, k, split):
    cfg = matmul_config(n, k, torch.bfloat16)
    assert (cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k) == (64, 64, 128, split)
    chunk = cfg.k_per_split(k)
    assert chunk % cfg.block_k == 0 and (split - 1) * chunk < k <= split * chunk  # none empty


def test_matmul_config_float32_halves_block_k():
    assert matmul_config(2048, 4096, torch.float32).block_k == 64


def test_matmul_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="block_n"):
        MatmulConfig(block_n=48)
    with pytest.raises(ValueError, match="split_k"):
        MatmulConfig(split_k=0)
    with pytest.raises(ValueError, match="weight"):
        matmul_config(0, 16, torch.float16)


def test_matmul_rejects_bad_arguments():
    x, w, b = linear_args(4, N_ODD, K_ODD, torch.float32, 0)
    with pytest.raises(ValueError, match="x must be"):
        matmul(x, w[:, :-1])
    with pytest.raises(TypeError, match="dtype"):
        matmul(x, w.half())
    with pytest.raises(ValueError, match="bias"):
        matmul(x, w, b[:-1])
    with pytest.raises(ValueError, match="out"):
        matmul(x, w, out=torch.empty(4, N_ODD + 1))


# --- CPU interpreter -------------------------------------------------------------------------
@interpreter_only
@pytest.mark.parametrize("m", [1, 33, 130])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_matches_reference(m, dtype, with_bias):
    x, w, b = linear_args(m, N_ODD, K_ODD, dtype, m, bias=with_bias)
    want = ref.matmul_ref(x, w, b)
    for cfg in (SMALL, SPLIT3) if m < 130 else (SPLIT3,):  # M = 130 in split-K only: time
        torch.testing.assert_close(matmul(x, w, b, config=cfg), want, **matmul_tol(dtype))


@interpreter_only
def test_matmul_default_split_config_and_out_argument():
    """N=40, K=600 gets split 2 by the rule (K ranges 384 + 216: a masked tail); out is used."""
    x, w, b = linear_args(33, 40, 600, torch.float32, 1)
    out = torch.full((33, 40), float("nan"))
    got = matmul(x, w, b, out=out)
    assert got is out
    torch.testing.assert_close(got, ref.matmul_ref(x, w, b), **matmul_tol(torch.float32))


@interpreter_only
def test_matmul_empty_batch():
    x, w, b = linear_args(0, N_ODD, K_ODD, torch.float16, 2)
    assert matmul(x, w, b).shape == (0, N_ODD)


@interpreter_only
@pytest.mark.parametrize("cfg", [SMALL, SPLIT3, None], ids=["split1", "split3", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rows_are_batch_invariant(cfg, dtype):
    x, w, b = linear_args(3, N_ODD, K_ODD, dtype, 3)
    assert_rows_invariant(lambda rows: matmul(rows, w, b, config=cfg), x, seed=4)


@interpreter_only
@pytest.mark.parametrize("m", [1, 33, 130])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hidden", "block"), [(40, None), (72, 32)])  # 72: 3 chunks
def test_rms_norm_matches_reference(m, dtype, hidden, block):
    gen = torch.Generator().manual_seed(m + hidden)
    x = (torch.randn(m, hidden, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    got = rms_norm(x, weight, 1e-6, block=block)
    torch.testing.assert_close(got, ref.rms_norm_ref(x, weight, 1e-6), **norm_tol(dtype, True))


@interpreter_only
def test_rms_norm_float32_weight_promotes_like_torch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 40, generator=gen).to(torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(40, generator=gen)  # float32
    got = rms_norm(x, weight, 1e-5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.rms_norm_ref(x, weight, 1e-5), **norm_tol(x.dtype, True))


@interpreter_only
@pytest.mark.parametrize("block", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rows_are_batch_invariant(block, dtype):
    gen = torch.Generator().manual_seed(6)
    rows = torch.randn(3, 72, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(72, generator=gen)).to(dtype)
    assert_rows_invariant(lambda r: rms_norm(r, weight, 1e-6, block=block), rows, seed=7)


# --- CUDA ------------------------------------------------------------------------------------
# (N, K): odd; split 8 (o_proj-like); split 4 (q_proj-like); router-like; split 1 (wide)
CUDA_SHAPES = [(N_ODD, K_ODD), (2048, 4096), (4096, 2048), (128, 2048), (32768, 1024)]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize(("n", "k"), CUDA_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_on_cuda(n, k, dtype):
    x, w, b = linear_args(256, n, k, dtype, n + k, device="cuda")
    torch.testing.assert_close(matmul(x, w, b), ref.matmul_ref(x, w, b), **matmul_tol(dtype))
    torch.testing.assert_close(matmul(x, w), ref.matmul_ref(x, w), **matmul_tol(dtype))
    for cfg in (SMALL, SPLIT3):
        torch.testing.assert_close(matmul(x[:33], w, b, config=cfg),
                                   ref.matmul_ref(x[:33], w, b), **matmul_tol(dtype))
    assert_rows_invariant(lambda rows: matmul(rows, w, b), x[:3], seed=n)
    assert_rows_invariant(lambda rows: matmul(rows, w, b, config=SPLIT3), x[:3], seed=k)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("hidden", [40, 2048, 7168, 10000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_on_cuda(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(256, hidden, generator=gen) * 3).to("cuda", dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to("cuda", dtype)
    got = rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, ref.rms_norm_ref(x, weight, 1e-6), **norm_tol(dtype, False))
    assert_rows_invariant(lambda r: rms_norm(r, weight, 1e-6), x[:3], seed=hidden)


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize(("n", "k"), [(2048, 4096), (32768, 1024)])  # split 8 and split 1
def test_matmul_captures_into_a_cuda_graph(n, k):
    x, w, b = linear_args(8, n, k, torch.bfloat16, 11, device="cuda")
    matmul(x, w, b)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = matmul(x, w, b)
    for seed in (12, 13):
        fresh = torch.randn(8, k, generator=torch.Generator().manual_seed(seed))
        x.copy_(fresh.to("cuda", torch.bfloat16))
        graph.replay()
        torch.testing.assert_close(static_out, matmul(x, w, b), rtol=0, atol=0)
