"""Paged KV cache bookkeeping: the block allocator's invariants under random allocate/free
sequences, the slot mapping, and how many blocks a GQA / MLA model gets on CPU and CUDA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from eaas.config import CacheConfig
from eaas.engine.blocks import (BlockAllocator, BlockTable, kv_cache_bytes_per_block,
                                num_blocks_for)
from eaas.errors import ConfigError, RequestError
from eaas.model.config import ModelConfig
from eaas.model.tiny import tiny_config

GIB = 1 << 30


# ---- worked examples -----------------------------------------------------------------------
def test_worked_example_of_the_module_docstring():
    a = BlockAllocator(num_blocks=8, block_size=4)
    ta = a.allocate("a", 6)
    assert ta is not None and ta.block_ids == (0, 1) and ta.capacity == 8
    tb = a.allocate("b", 9)
    assert tb is not None and tb.block_ids == (2, 3, 4)
    assert a.free("a") == 2
    tc = a.allocate("c", 12)
    assert tc is not None and tc.block_ids == (0, 1, 5)  # lowest free ids first
    assert tc.slot(9) == 5 * 4 + 1
    assert (a.num_used, a.num_free, a.usage) == (6, 2, 0.75)


def test_slot_mapping_follows_the_block_table():
    t = BlockTable("r", (7, 2, 5), block_size=16)
    assert [t.slot(p) for p in (0, 15, 16, 31, 32, 47)] == [112, 127, 32, 47, 80, 95]
    assert t.slots(14, 18) == [126, 127, 32, 33]
    assert t.slots(0, 48) == [t.slot(p) for p in range(48)]
    assert (t.num_blocks, t.capacity) == (3, 48)
    with pytest.raises(IndexError, match="position 48 is outside request 'r'"):
        t.slot(48)
    with pytest.raises(IndexError, match="position -1"):
        t.slot(-1)
    with pytest.raises(IndexError, match=r"positions \[40, 49\)"):
        t.slots(40, 49)


def test_blocks_for_is_ceil_division():
    a = BlockAllocator(4, 16)
    assert [a.blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="num_tokens=-1"):
        a.blocks_for(-1)


def test_too_big_is_an_error_busy_is_none():
    a = BlockAllocator(num_blocks=4, block_size=16)
    msg = (r"request needs 5 blocks of 16 tokens \(65 tokens\) but the KV cache has only 4 "
           r"blocks; lower max_tokens or raise cache.num_blocks / cache.gpu_memory_utilization")
    with pytest.raises(RequestError, match=msg):
        a.allocate("big", 65)
    with pytest.raises(RequestError, match=msg):
        a.check_fits(65)
    assert a.num_free == 4 and "big" not in a
    assert a.allocate("x", 40) is not None  # 3 blocks
    assert not a.can_allocate(17) and a.allocate("y", 17) is None  # busy: waits
    assert "y" not in a and a.num_free == 1
    a.check_fits(64)  # fits an empty pool: no error even while busy
    a.free("x")
    assert a.allocate("y", 17) is not None


def test_free_is_idempotent_and_double_allocation_is_an_error():
    a = BlockAllocator(4, 2)
    assert a.allocate("r", 3) is not None
    with pytest.raises(ValueError, match="request 'r' already holds 2 KV blocks") as e:
        a.allocate("r", 1)
    assert not isinstance(e.value, RequestError)  # an engine bug, not a bad request
    assert a.free("r") == 2 and a.free("r") == 0 and a.free("never") == 0
    assert a.num_free == 4 and len(a) == 0


def test_zero_tokens_get_an_empty_table():
    a = BlockAllocator(1, 16)
    t = a.allocate("r", 0)
    assert t is not None and t.block_ids == () and t.capacity == 0 and a.num_free == 1


def test_first_block_id_keeps_a_scratch_block_out():
    a = BlockAllocator(3, 4, first_block_id=1)
    t = a.allocate("r", 12)
    assert t is not None and t.block_ids == (1, 2, 3) and a.usage == 1.0
    assert a.allocate("s", 1) is None
    with pytest.raises(RequestError, match="has only 3 blocks"):
        a.allocate("s", 13)


@pytest.mark.parametrize("kw,what", [
    ({"num_blocks": 0}, "num_blocks=0 is not allowed: an integer >= 1"),
    ({"block_size": 0}, "block_size=0 is not allowed: an integer >= 1"),
    ({"num_blocks": True}, "num_blocks=True"),
    ({"block_size": 1.5}, "block_size=1.5"),
    ({"first_block_id": -1}, "first_block_id=-1 is not allowed: an integer >= 0"),
])
def test_bad_pool_sizes(kw, what):
    with pytest.raises(ValueError, match=what):
        BlockAllocator(**{"num_blocks": 4, "block_size": 16, **kw})


# ---- properties ----------------------------------------------------------------------------
class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free interleavings against a model of which request holds what."""

    def __init__(self) -> None:
        super().__init__()
        self.a = BlockAllocator(1, 1)
        self.live: dict[str, BlockTable] = {}
        self.next_id = 0

    @initialize(num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 4, 16]),
                first=st.sampled_from([0, 1]))
    def make(self, num_blocks: int, block_size: int, first: int) -> None:
        self.a = BlockAllocator(num_blocks, block_size, first_block_id=first)

    def _new_id(self) -> str:
        self.next_id += 1
        return f"r{self.next_id}"

    @rule(frac=st.floats(0, 1.5))
    def allocate(self, frac: float) -> None:
        a = self.a
        num_tokens = int(frac * a.num_blocks * a.block_size)
        need, free_before, rid = a.blocks_for(num_tokens), a.num_free, self._new_id()
        if need > a.num_blocks:
            with pytest.raises(RequestError, match=f"needs {need} blocks"):
                a.allocate(rid, num_tokens)
            assert not a.can_allocate(num_tokens)
        elif need > free_before:
            assert not a.can_allocate(num_tokens)
            assert a.allocate(rid, num_tokens) is None
        else:
            assert a.can_allocate(num_tokens)
            t = a.allocate(rid, num_tokens)
            assert t is not None and t.num_blocks == need and t.capacity >= num_tokens
            self.live[rid] = t
        assert a.num_free == free_before - (need if rid in self.live else 0)

    @precondition(lambda self: self.a.num_free > 0)
    @rule()
    def fill_exactly_what_is_free(self) -> None:
        """Fragmentation never matters: any free blocks serve any request."""
        a = self.a
        rid = self._new_id()
        t = a.allocate(rid, a.num_free * a.block_size)
        assert t is not None and a.num_free == 0
        self.live[rid] = t

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        a = self.a
        rid = data.draw(st.sampled_from(sorted(self.live)))
        assert a.free(rid) == self.live.pop(rid).num_blocks
        assert a.free(rid) == 0

    @invariant()
    def blocks_are_conserved_and_never_shared(self) -> None:
        a = self.a
        held = [b for t in self.live.values() for b in t.block_ids]
        assert len(held) == len(set(held))  # no block handed to two live requests
        first = a.first_block_id
        assert all(first <= b < first + a.num_blocks for b in held)
        assert a.num_free + len(held) == a.num_blocks
        assert a.num_used == len(held) and a.usage == len(held) / a.num_blocks
        assert {rid: a.table(rid) for rid in self.live} == self.live and len(a) == len(self.live)

    def teardown(self) -> None:
        for rid in list(self.live):
            self.a.free(rid)
        assert self.a.num_free == self.a.num_blocks and len(self.a) == 0  # all came back


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=12), st.data())
def test_reuse_depends_only_on_the_free_set(sizes: list[int], data: st.DataObject):
    """Two allocators with the same free set hand out the same ids, whatever order freed them."""
    a, b = BlockAllocator(32, 4), BlockAllocator(32, 4)
    for i, n in enumerate(sizes):
        a.allocate(f"r{i}", n)
        b.allocate(f"r{i}", n)
    ids = [f"r{i}" for i in range(len(sizes)) if f"r{i}" in a]
    gone = data.draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
    for rid in gone:
        a.free(rid)
    for rid in reversed(gone):
        b.free(rid)
    n = data.draw(st.integers(0, a.num_free * 4))
    ta, tb = a.allocate("new", n), b.allocate("new", n)
    assert ta is not None and tb is not None and ta.block_ids == tb.block_ids
    assert list(ta.block_ids) == sorted(ta.block_ids)


# ---- sizing --------------------------------------------------------------------------------
def model(arch: str) -> ModelConfig:
    return ModelConfig.from_dict(tiny_config(arch, 256, 1))


def test_bytes_per_block_gqa_and_mla():
    q3 = model("qwen3_moe")  # 3 layers, 2 KV heads of 16
    assert kv_cache_bytes_per_block(q3, torch.float32, 16) == 2 * 2 * 16 * 4 * 3 * 16
    assert kv_cache_bytes_per_block(q3, torch.bfloat16, 16) == 2 * 2 * 16 * 2 * 3 * 16
    mix = model("mixtral")  # 2 layers, 2 KV heads of 64 / 4 = 16
    assert kv_cache_bytes_per_block(mix, torch.float16, 8) == 2 * 2 * 16 * 2 * 2 * 8
    ds = model("deepseek_v3")  # MLA: latent 32 + rope key 8, 3 layers
    assert ds.is_mla
    assert kv_cache_bytes_per_block(ds, torch.float32, 16) == (32 + 8) * 4 * 3 * 16


def test_num_blocks_on_cpu_and_its_caps():
    q3 = model("qwen3_moe")
    per_block = 2 * 2 * 16 * 4 * 3 * 16  # 12288 bytes
    cfg = CacheConfig(cpu_kv_cache_space_gib=0.001)
    want = int(0.001 * GIB) // per_block  # 87 blocks, below the cap of 64 * 32
    assert num_blocks_for(cfg, q3, torch.float32, "cpu", 64, 512) == want == 87
    assert num_blocks_for(cfg, q3, torch.float32, "cpu", 8, 512, pools_on_device=2) == 43
    # the default 4 GiB would hold far more than 64 sequences of 512 tokens could ever use
    assert num_blocks_for(CacheConfig(), q3, torch.float32, "cpu", 64, 512) == 64 * 32
    assert num_blocks_for(CacheConfig(), q3, torch.float32, "cpu", 3, 17) == 3 * 2
    fixed = CacheConfig(num_blocks=5)
    assert num_blocks_for(fixed, q3, torch.float32, "cpu", 64, 512) == 5  # even below max_num_seqs
    assert num_blocks_for(CacheConfig(num_blocks=10**6), q3, torch.float32, "cpu", 2, 64) == 8


def test_num_blocks_on_cuda_uses_free_memory_minus_the_reserve(monkeypatch):
    ds = model("deepseek_v3")
    per_block = (32 + 8) * 2 * 3 * 16  # bf16: 3840 bytes
    seen = []

    def mem_get_info(device):
        seen.append(device)
        return 50 * GIB, 80 * GIB  # free now (weights loaded), total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cfg = CacheConfig(gpu_memory_utilization=0.9)
    budget = 42 * GIB  # 50 GiB free - (1 - 0.9) * 80 GiB
    huge = 10**9  # max_model_len large enough that the cap does not bind
    assert num_blocks_for(cfg, ds, torch.bfloat16, "cuda:1", 4, huge) == budget // per_block
    assert seen == ["cuda:1"]
    two = num_blocks_for(cfg, ds, torch.bfloat16, "cuda:1", 4, huge, pools_on_device=2)
    assert two == budget // 2 // per_block
    assert num_blocks_for(cfg, ds, torch.bfloat16, "cuda:1", 4, 160) == 4 * 10  # the cap


def test_cuda_with_too_little_memory_names_the_knobs(monkeypatch):
    ds = model("deepseek_v3")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * GIB, 80 * GIB))
    cfg = CacheConfig(gpu_memory_utilization=0.5)  # reserve 40 GiB > 10 GiB free: nothing left
    with pytest.raises(ConfigError, match=r"gets 0 blocks of 16 tokens .*cuda:0: 10\.00 GiB free "
                       r"of 80\.00 GiB.*raise cache\.gpu_memory_utilization.*max_num_seqs"):
        num_blocks_for(cfg, ds, torch.bfloat16, "cuda:0", 4, 512)
    per_block = (32 + 8) * 2 * 3 * 16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * per_block, 3 * per_block))
    with pytest.raises(ConfigError, match="gets 3 blocks .*fewer than scheduler.max_num_seqs=4"):
        num_blocks_for(CacheConfig(gpu_memory_utilization=1.0), ds, torch.bfloat16, "cuda", 4, 512)
    assert num_blocks_for(CacheConfig(gpu_memory_utilization=1.0), ds, torch.bfloat16, "cuda",
                          3, 512) == 3


def test_cpu_with_too_little_space_is_an_error():
    with pytest.raises(ConfigError, match=r"cpu_kv_cache_space_gib=1e-06.*raise "
                       r"cache\.cpu_kv_cache_space_gib"):
        num_blocks_for(CacheConfig(cpu_kv_cache_space_gib=1e-6), model("qwen3_moe"),
                       torch.float32, "cpu", 1, 512)
