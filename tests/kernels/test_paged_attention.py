"""Paged decode attention (GQA and absorbed MLA): Triton vs the references, the references vs a
dense attention computed per sequence, batch invariance, padding rows, and argument checks."""

from __future__ import annotations

import pytest
import torch

from eaas_kernels import paged_decode_gqa, paged_decode_mla
from eaas_kernels import reference_attention as ref
from eaas_kernels.paged_attention import (
    PagedAttentionConfig,
    paged_decode_gqa_triton,
    paged_decode_mla_triton,
)

from .conftest import TOLERANCE, cuda_only, interpreter_only

# 32-token partitions walked in 16-token chunks: short sequences still cross partitions
SMALL = PagedAttentionConfig(partition=32, block_n=16, block_h=16)
BLOCK = 8  # blocks straddle the 16-token chunks
# 1, at block edges (8, 16), at / across partition edges (32, 33, 64, 70), a padding row (0)
LENS = [1, 8, 16, 31, 32, 33, 70, 0, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tables(lens: list[int], block_size: int, gen: torch.Generator, pad: int | None = None):
    """(block_tables int32 [B, max_blocks], seq_lens int32 [B], num_blocks): every row owns
    distinct blocks drawn from one shuffled pool (so tables are non-contiguous), plus a column
    of padding; padding entries are random blocks in range, or `pad` when given."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    pool = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(lens), max(need) + 1), generator=gen)
    if pad is not None:
        tables.fill_(pad)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = pool[used : used + n]
        used += n
    return tables.int(), torch.tensor(lens, dtype=torch.int32), num_blocks


def _gqa_problem(lens, num_kv_heads, rep, head_dim, dtype, gen, block_size=BLOCK, device="cpu"):
    tables, seq_lens, num_blocks = _tables(lens, block_size, gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q = torch.randn(len(lens), num_kv_heads * rep, head_dim, generator=gen)  # [B, nh, d]
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    args = [t.to(device, dtype) for t in (q, k, v)] + [tables.to(device), seq_lens.to(device)]
    return args, head_dim**-0.5, tables.shape[1] * block_size


def _mla_problem(lens, num_heads, lora, rope, dtype, gen, block_size=BLOCK, device="cpu"):
    """Latent and rope caches as views of one [num_blocks, block_size, L + R] buffer (strided)."""
    tables, seq_lens, num_blocks = _tables(lens, block_size, gen)
    cache = torch.randn(num_blocks, block_size, lora + rope, generator=gen).to(device, dtype)
    q_lat = torch.randn(len(lens), num_heads, lora, generator=gen).to(device, dtype)
    q_rope = torch.randn(len(lens), num_heads, rope, generator=gen).to(device, dtype)
    args = [q_lat, q_rope, cache[..., :lora], cache[..., lora:], tables.to(device),
            seq_lens.to(device)]
    return args, (lora + rope) ** -0.5, tables.shape[1] * block_size


# --- Triton (CPU interpreter) vs reference -------------------------------------------------------
@interpreter_only
@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_triton_matches_reference(rep, head_dim, dtype):
    gen = torch.Generator().manual_seed(rep * 100 + head_dim)
    args, scale, max_len = _gqa_problem(LENS, 2, rep, head_dim, dtype, gen)
    got = paged_decode_gqa_triton(*args, scale, max_len, config=SMALL)
    want = ref.paged_decode_gqa_ref(*args, scale, max_len)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert torch.all(got[LENS.index(0)] == 0)


@interpreter_only
@pytest.mark.parametrize("window", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_sliding_window_matches_reference(window, dtype):
    """block_size 6: blocks fall across chunks and partitions at odd places."""
    gen = torch.Generator().manual_seed(window)
    lens = [1, 5, 6, 40, 41, 75, 0]
    args, scale, max_len = _gqa_problem(lens, 2, 3, 16, dtype, gen, block_size=6)
    got = paged_decode_gqa_triton(*args, scale, max_len, window=window, config=SMALL)
    want = ref.paged_decode_gqa_ref(*args, scale, max_len, window=window)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@interpreter_only
@pytest.mark.parametrize("num_heads", [4, 20])  # 20: two head blocks of 16, the second padded
@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_triton_matches_reference(num_heads, dtype):
    gen = torch.Generator().manual_seed(num_heads)
    args, scale, max_len = _mla_problem(LENS, num_heads, 32, 16, dtype, gen)
    got = paged_decode_mla_triton(*args, scale, max_len, config=SMALL)
    want = ref.paged_decode_mla_ref(*args, scale, max_len)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert torch.all(got[LENS.index(0)] == 0)


@interpreter_only
def test_default_configs_cross_a_512_token_partition():
    gen = torch.Generator().manual_seed(5)
    lens = [1, 512, 600]
    args, scale, max_len = _gqa_problem(lens, 1, 4, 16, torch.float32, gen, block_size=16)
    got = paged_decode_gqa_triton(*args, scale, max_len)
    torch.testing.assert_close(got, ref.paged_decode_gqa_ref(*args, scale, max_len),
                               **TOLERANCE[torch.float32])
    args, scale, max_len = _mla_problem(lens, 2, 32, 16, torch.float32, gen, block_size=16)
    got = paged_decode_mla_triton(*args, scale, max_len)
    torch.testing.assert_close(got, ref.paged_decode_mla_ref(*args, scale, max_len),
                               **TOLERANCE[torch.float32])


@interpreter_only
def test_hidden_slots_and_padding_table_entries_are_never_used():
    """Every cache entry no query may see is NaN and padding table entries point far out of
    range: a kernel that read (or mixed in) any of them would give NaN or crash."""
    gen = torch.Generator().manual_seed(6)
    lens, window = [0, 3, 20, 45], 17
    tables, seq_lens, num_blocks = _tables(lens, BLOCK, gen, pad=1 << 30)
    k = torch.full((num_blocks, BLOCK, 1, 16), float("nan"))
    v = k.clone()
    for b, n in enumerate(lens):
        for j in range(max(0, n - window), n):
            blk, off = int(tables[b, j // BLOCK]), j % BLOCK
            k[blk, off], v[blk, off] = torch.randn(2, 1, 16, generator=gen)
    q = torch.randn(len(lens), 4, 16, generator=gen)
    max_len = tables.shape[1] * BLOCK
    got = paged_decode_gqa_triton(q, k, v, tables, seq_lens, 0.25, max_len, window, config=SMALL)
    want = ref.paged_decode_gqa_ref(q, k, v, tables, seq_lens, 0.25, max_len, window)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    assert torch.all(got[0] == 0)


def _invariance_case(kind: str, dtype: torch.dtype, device: str, config=None):
    """(one row computed alone, the same row at index 3 of B = 7 with other rows and a larger
    max_seq_len)."""
    gen = torch.Generator().manual_seed(7)
    lens = [5, 130, 0, 77, 260, 1, 33]
    if kind == "gqa":
        args, scale, max_len = _gqa_problem(lens, 2, 4, 32, dtype, gen, device=device)
        fn = paged_decode_gqa_triton
    else:
        args, scale, max_len = _mla_problem(lens, 16, 64, 16, dtype, gen, device=device)
        fn = paged_decode_mla_triton
    *queries, tables, seq_lens = args
    alone = [t[3:4] for t in queries[: 2 if kind == "mla" else 1]]
    caches = queries[len(alone):]
    width = -(-lens[3] // BLOCK)
    one = fn(*alone, *caches, tables[3:4, :width].contiguous(), seq_lens[3:4].contiguous(),
             scale, width * BLOCK, config=config)
    batch = fn(*args, scale, max_len, config=config)
    return one[0], batch[3]


@interpreter_only
@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("config", [SMALL, None], ids=["small", "default"])
def test_row_is_bitwise_independent_of_the_batch(kind, config):
    alone, in_batch = _invariance_case(kind, torch.bfloat16, "cpu", config)
    assert torch.equal(alone, in_batch)


# --- references vs dense attention, dispatch, argument checks ------------------------------------
def _dense_gqa(q, k_cache, v_cache, tables, seq_lens, scale, window=None):
    """Per sequence: concatenate its blocks, slice its keys, float64 softmax attention."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    rep = q.shape[1] // k_cache.shape[2]
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        blocks = tables[b, : -(-n // k_cache.shape[1])].tolist()
        k = torch.cat([k_cache[i] for i in blocks])[:n].double()  # [n, nkv, d]
        v = torch.cat([v_cache[i] for i in blocks])[:n].double()
        first = 0 if window is None else max(0, n - window)
        k, v = k[first:].repeat_interleave(rep, 1), v[first:].repeat_interleave(rep, 1)
        scores = torch.einsum("hd,shd->hs", q[b].double(), k) * scale  # [nh, S]
        out[b] = torch.einsum("hs,shd->hd", torch.softmax(scores, -1), v)
    return out


@pytest.mark.parametrize("window", [None, 9])
def test_gqa_reference_matches_dense_attention(window):
    gen = torch.Generator().manual_seed(8)
    args, scale, max_len = _gqa_problem(LENS, 2, 4, 16, torch.float32, gen, block_size=5)
    got = ref.paged_decode_gqa_ref(*args, scale, max_len, window=window)
    torch.testing.assert_close(got.double(), _dense_gqa(*args, scale, window), atol=1e-5,
                               rtol=1e-5)


def test_mla_reference_matches_dense_attention():
    """MLA is GQA with one kv head whose key is [kv, rope] and whose value is kv."""
    gen = torch.Generator().manual_seed(9)
    q_lat, q_rope, kv, rope, tables, seq_lens = _mla_problem(LENS, 3, 24, 8, torch.float32,
                                                             gen)[0]
    got = ref.paged_decode_mla_ref(q_lat, q_rope, kv, rope, tables, seq_lens, 0.3, 80)
    key = torch.cat([kv, rope], -1).unsqueeze(2)  # [NB, BS, 1, L + R]
    value = torch.cat([kv, torch.zeros_like(rope)], -1).unsqueeze(2)
    dense = _dense_gqa(torch.cat([q_lat, q_rope], -1), key, value, tables, seq_lens, 0.3)
    torch.testing.assert_close(got.double(), dense[..., :24], atol=1e-5, rtol=1e-5)


def test_dispatch_on_cpu_runs_the_reference_into_out():
    gen = torch.Generator().manual_seed(10)
    args, scale, max_len = _gqa_problem(LENS, 1, 2, 16, torch.bfloat16, gen)
    out = torch.full_like(args[0], float("nan"))
    got = paged_decode_gqa(*args, scale, max_len, 7, out=out)
    assert got is out
    assert torch.equal(out, ref.paged_decode_gqa_ref(*args, scale, max_len, 7))
    args, scale, max_len = _mla_problem(LENS, 2, 16, 16, torch.float32, gen)
    assert torch.equal(paged_decode_mla(*args, scale, max_len),
                       ref.paged_decode_mla_ref(*args, scale, max_len))


def test_argument_errors_name_the_problem():
    gen = torch.Generator().manual_seed(11)
    (q, k, v, tables, lens), scale, max_len = _gqa_problem([3, 9], 2, 2, 16, torch.float32, gen)
    with pytest.raises(TypeError, match="block_tables must be int32"):
        paged_decode_gqa(q, k, v, tables.long(), lens, scale, max_len)
    with pytest.raises(TypeError, match="seq_lens must be int32"):
        paged_decode_gqa(q, k, v, tables, lens.long(), scale, max_len)
    with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
        paged_decode_gqa(q[:, :3], k, v, tables, lens, scale, max_len)
    with pytest.raises(ValueError, match="window must be"):
        paged_decode_gqa(q, k, v, tables, lens, scale, max_len, window=0)
    with pytest.raises(TypeError, match="max_seq_len must be a host int"):
        paged_decode_gqa(q, k, v, tables, lens, scale, torch.tensor(max_len))
    with pytest.raises(ValueError, match="past max_seq_len=4"):
        paged_decode_gqa(q, k, v, tables, lens, scale, 4)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_gqa(q, k, v, tables, lens, scale, max_len, out=q.half())
    with pytest.raises(ValueError, match="unit stride"):
        strided = k.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, stride(-1) = 2
        paged_decode_gqa_triton(q, strided, v, tables, lens, scale, max_len)
    with pytest.raises(ValueError, match="multiple of block_n"):
        PagedAttentionConfig(partition=40, block_n=16, block_h=16)


# --- CUDA ----------------------------------------------------------------------------------------
def _ragged_lens(num_seqs: int, gen: torch.Generator, longest: int) -> list[int]:
    lens = torch.randint(1, longest, (num_seqs,), generator=gen).tolist()
    lens[:4] = [1, 16, 512, 0][: len(lens)]
    return lens


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 300])
def test_gqa_on_cuda_qwen3_shape(dtype, window):
    """Qwen3-30B-A3B attention: 32 q heads, 4 kv heads, head_dim 128, block_size 16."""
    gen = torch.Generator().manual_seed(12)
    lens = _ragged_lens(33, gen, 2100)
    args, scale, max_len = _gqa_problem(lens, 4, 8, 128, dtype, gen, 16, "cuda")
    got = paged_decode_gqa(*args, scale, max_len, window)
    want = ref.paged_decode_gqa_ref(*args, scale, max_len, window)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads", [16, 128])
def test_mla_on_cuda_deepseek_shape(dtype, num_heads):
    """DeepSeek-V3 latent: L = 512, R = 64, block_size 64."""
    gen = torch.Generator().manual_seed(13)
    lens = _ragged_lens(9, gen, 1500)
    args, scale, max_len = _mla_problem(lens, num_heads, 512, 64, dtype, gen, 64, "cuda")
    got = paged_decode_mla(*args, scale, max_len)
    want = ref.paged_decode_mla_ref(*args, scale, max_len)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_is_bitwise_independent_of_the_batch_on_cuda(kind, config, dtype):
    alone, in_batch = _invariance_case(kind, dtype, "cuda", config)
    assert torch.equal(alone, in_batch)


@pytest.mark.cuda
@cuda_only
def test_gqa_captures_into_a_cuda_graph():
    """Capture once, then change the lengths and tables in place and replay."""
    gen = torch.Generator().manual_seed(14)
    args, scale, max_len = _gqa_problem([700, 3, 0, 64], 4, 8, 128, torch.bfloat16, gen, 16,
                                        "cuda")
    q, k, v, tables, lens = args
    out = torch.empty_like(q)
    paged_decode_gqa(q, k, v, tables, lens, scale, max_len, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_gqa(q, k, v, tables, lens, scale, max_len, out=out)
    tables.copy_(tables.flip(0))  # rows now own the blocks of [64, 0, 3, 700] tokens
    lens.copy_(torch.tensor([60, 0, 3, 690], dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(out, ref.paged_decode_gqa_ref(q, k, v, tables, lens, scale,
                                                             max_len), **TOLERANCE[q.dtype])
