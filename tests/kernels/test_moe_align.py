"""Align (sort pairs by expert into padded blocks) and weighted combine: kernels vs references."""

from __future__ import annotations

import pytest
import torch

from eaas_kernels import reference as ref
from eaas_kernels.moe_align import moe_align_block_size_triton, moe_combine_triton

from .conftest import interpreter_only


def test_reference_worked_example():
    got = ref.moe_align_block_size_ref(torch.tensor([[2, 0], [2, 1]]), num_experts=3, block_m=2)
    assert got.sorted_ids.tolist() == [1, 4, 3, 4, 0, 2, 4, 4]
    assert got.expert_ids.tolist() == [0, 1, 2, -1]
    assert got.num_post_padded.tolist() == [6]


def _check_alignment_invariants(align: ref.Alignment, topk_ids: torch.Tensor, block_m: int) -> None:
    """Every pair appears once, in a block of its own expert, pairs of an expert ascending."""
    flat = topk_ids.reshape(-1)
    used = int(align.num_post_padded)
    rows = align.sorted_ids[:used].long()
    real = rows < flat.numel()
    assert sorted(rows[real].tolist()) == list(range(flat.numel()))
    block_of_row = torch.arange(used) // block_m
    assert torch.equal(flat[rows[real]].int(), align.expert_ids[block_of_row[real]])
    assert (align.sorted_ids[used:] == flat.numel()).all()
    assert (align.expert_ids[used // block_m:] == -1).all()


@interpreter_only
@pytest.mark.parametrize("num_tokens", [1, 33, 130])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_triton_matches_reference(num_tokens, k, block_m):
    gen = torch.Generator().manual_seed(num_tokens + 7 * k)
    num_experts = 24
    present = torch.tensor([0, 3, 4, 11, 17, 18, 22, 23])  # 16 experts get no tokens
    topk_ids = present[torch.randint(0, len(present), (num_tokens, k), generator=gen)]
    got = moe_align_block_size_triton(topk_ids, num_experts, block_m)
    want = ref.moe_align_block_size_ref(topk_ids, num_experts, block_m)
    _check_alignment_invariants(want, topk_ids, block_m)
    for name, g, w in zip(ref.Alignment._fields, got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@interpreter_only
@pytest.mark.parametrize(("num_tokens", "k"), [(1, 1), (33, 2), (130, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_combine_triton_matches_reference(num_tokens, k, dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    expert_out = torch.randn(num_tokens * k, 72, generator=gen).to(dtype)  # [T*K, H]
    weights = torch.rand(num_tokens, k, generator=gen)  # [T, K]
    got = moe_combine_triton(expert_out, weights)
    want = ref.moe_combine_ref(expert_out, weights)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, want, **tol)


@interpreter_only
@pytest.mark.parametrize(
    ("num_tokens", "k", "max_programs"), [(33, 8, 3), (130, 8, 128), (40, 2, 1)]
)
def test_align_multi_program_path_matches_reference(num_tokens, k, max_programs):
    """More pairs than one program's BLOCK_N: the count + scatter kernels over several chunks."""
    gen = torch.Generator().manual_seed(num_tokens * k)
    topk_ids = torch.randint(0, 200, (num_tokens, k), generator=gen) // 2 * 2  # odd ids empty
    got = moe_align_block_size_triton(topk_ids, 200, 16, max_programs=max_programs)
    want = ref.moe_align_block_size_ref(topk_ids, 200, 16)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
