"""ops.linear / ops.rms_norm with batch_invariant: unchanged on CPU (row by row, or the plain op
when False); on CUDA the Triton kernels of eaas_kernels.invariant, row-invariant and close to
the plain ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eaas.model import ops

DTYPES = [torch.float32, torch.bfloat16]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _args(m, n, k, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=gen).to(device, dtype)  # [M, K]
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)  # [N, K]
    b = torch.randn(n, generator=gen).to(device, dtype)  # [N]
    return x, w, b


def _norm_args(m, hidden, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(m + hidden)
    x = (torch.randn(m, hidden, generator=gen) * 3).to(device, dtype)  # [M, H]
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)  # [H]
    return x, weight


def _old_rms_norm(x, weight, eps):  # ops.rms_norm before batch_invariant existed
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_linear_is_unchanged(dtype):
    x, w, b = _args(33, 40, 72, dtype)
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
    rows = torch.cat([F.linear(x[i : i + 1], w, b) for i in range(33)])
    assert torch.equal(ops.linear(x, w, b, batch_invariant=True), rows)
    assert torch.equal(ops.linear(x, w, None, True), ops.rowwise(lambda r: F.linear(r, w), x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_rms_norm_is_unchanged(dtype):
    x, weight = _norm_args(33, 72, dtype)
    assert torch.equal(ops.rms_norm(x, weight, 1e-6), _old_rms_norm(x, weight, 1e-6))
    rows = torch.cat([_old_rms_norm(x[i : i + 1], weight, 1e-6) for i in range(33)])
    assert torch.equal(ops.rms_norm(x, weight, 1e-6, batch_invariant=True), rows)
    x3 = x.view(3, 11, 72)  # leading dims are flattened into rows
    assert torch.equal(ops.rms_norm(x3, weight, 1e-6, True), rows.view(3, 11, 72))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(40, 72), (2048, 4096)])
def test_cuda_linear_is_row_invariant_and_close_to_f_linear(dtype, n, k):
    x, w, b = _args(130, n, k, dtype, "cuda")
    got = ops.linear(x, w, b, batch_invariant=True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, F.linear(x, w, b), **tol)
    for i in (0, 64, 129):
        assert torch.equal(ops.linear(x[i : i + 1], w, b, True)[0], got[i])
    assert torch.equal(ops.linear(x[:33], w, b, True), got[:33])
    assert torch.equal(ops.linear(x[:128].view(4, 32, k), w, b, True), got[:128].view(4, 32, n))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_rms_norm_is_row_invariant_and_close_to_plain(dtype):
    x, weight = _norm_args(130, 2048, dtype, "cuda")
    got = ops.rms_norm(x, weight, 1e-6, batch_invariant=True)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    torch.testing.assert_close(got, ops.rms_norm(x, weight, 1e-6), atol=eps, rtol=eps)
    for i in (0, 64, 129):
        assert torch.equal(ops.rms_norm(x[i : i + 1], weight, 1e-6, True)[0], got[i])
