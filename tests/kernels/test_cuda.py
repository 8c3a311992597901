"""On a CUDA GPU: every kernel vs its reference in bf16/fp16/fp32 up to T = 4096, and the whole
expert path (router -> fused_moe) captured into one CUDA graph and replayed."""

from __future__ import annotations

import pytest
import torch

import eaas_kernels as ek
from eaas_kernels import reference as ref
from eaas_kernels.moe_align import moe_align_block_size_triton

from .conftest import TOLERANCE, cuda_only, distinct_logits, moe_weights

pytestmark = [pytest.mark.cuda, cuda_only]

E, H, F = 64, 256, 192
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("num_tokens", [1, 33, 130, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_routers_on_cuda(num_tokens, dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    logits = distinct_logits(num_tokens, 256, gen).to("cuda", dtype)
    for k in (1, 2, 8):
        got = ek.topk_softmax(logits, k, True)
        want = ref.topk_softmax_ref(logits, k, True)
        torch.testing.assert_close(got.topk_ids, want.topk_ids, rtol=0, atol=0)
        torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)
    bias = (torch.randn(256, generator=gen) * 0.05).cuda()
    got = ek.topk_grouped_sigmoid(logits, bias, 8, 8, 4, 2.5, True)
    want = ref.topk_grouped_sigmoid_ref(logits, bias, 8, 8, 4, 2.5, True)
    torch.testing.assert_close(got.topk_ids, want.topk_ids, rtol=0, atol=0)
    torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_tokens", [1, 33, 130, 4096])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_align_on_cuda(num_tokens, k):
    gen = torch.Generator().manual_seed(num_tokens + k)
    topk_ids = torch.randint(0, E // 2, (num_tokens, k), generator=gen).cuda() * 2  # odd: empty
    for block_m in (16, 64, 128):
        got = moe_align_block_size_triton(topk_ids, E, block_m)
        want = ref.moe_align_block_size_ref(topk_ids, E, block_m)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("num_tokens", [1, 33, 130, 4096])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_moe_and_expert_rows_on_cuda(num_tokens, k, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 10 + k)
    w_gate_up, w_down = moe_weights(E, H, F, dtype, gen, device="cuda")
    x = torch.randn(num_tokens, H, generator=gen).to("cuda", dtype)
    scores = torch.rand(num_tokens, E // 2, generator=gen)
    topk_ids = (scores.topk(k, dim=-1).indices * 2 + 1).cuda()  # even experts get no tokens
    topk_weights = torch.rand(num_tokens, k, generator=gen).cuda()
    got = ek.fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)
    want = ref.fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    rows = ek.expert_rows(x, topk_ids[:, 0], w_gate_up, w_down)
    torch.testing.assert_close(rows, ref.expert_rows_ref(x, topk_ids[:, 0], w_gate_up, w_down),
                               **TOLERANCE[dtype])


def test_expert_path_captures_into_a_cuda_graph():
    gen = torch.Generator().manual_seed(9)
    dtype, num_tokens = torch.bfloat16, 48
    w_gate_up, w_down = moe_weights(E, H, F, dtype, gen, device="cuda")
    router = (torch.randn(E, H, generator=gen) / H**0.5).to("cuda", dtype)
    bias = (torch.randn(E, generator=gen) * 0.05).cuda()
    x = torch.randn(num_tokens, H, generator=gen).to("cuda", dtype)

    def layer(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = inp @ router.T  # [T, E]
        soft = ek.topk_softmax(logits, 8, True)
        grouped = ek.topk_grouped_sigmoid(logits, bias, 8, 8, 4, 2.5, True)
        out = ek.fused_moe(inp, w_gate_up, w_down, soft.topk_ids, soft.topk_weights)
        out = out + ek.fused_moe(inp, w_gate_up, w_down, grouped.topk_ids, grouped.topk_weights)
        return out, ek.expert_rows(inp, soft.topk_ids[:, 0], w_gate_up, w_down)

    layer(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_rows = layer(x)
    for seed in (10, 11):
        fresh = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(seed))
        x.copy_(fresh.to("cuda", dtype))
        graph.replay()
        want_out, want_rows = layer(x)
        torch.testing.assert_close(static_out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(static_rows, want_rows, rtol=0, atol=0)
    # and the eager path itself still matches the reference
    soft = ref.topk_softmax_ref(x @ router.T, 8, True)
    torch.testing.assert_close(
        ek.fused_moe(x, w_gate_up, w_down, soft.topk_ids, soft.topk_weights),
        ref.fused_moe_ref(x, w_gate_up, w_down, soft.topk_ids, soft.topk_weights),
        **TOLERANCE[dtype],
    )
