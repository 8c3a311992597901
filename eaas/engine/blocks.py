"""Host-side bookkeeping of the paged KV cache (vLLM-style): a pool of fixed-size blocks, a
free list, one block table per request, and how many blocks a device can hold.

The device side is one preallocated buffer per layer, viewed as `[num_blocks * block_size, ...]`
token slots; this module owns no tensor. A request's token at position p lives in slot
`block_ids[p // block_size] * block_size + p % block_size` (`BlockTable.slot`).

Admission reserves every block a request can ever need (prompt + max new tokens), so a running
request never runs out of cache and nothing is ever preempted. Two outcomes are kept apart:
- the request can never fit (it needs more blocks than the whole pool): `allocate` and
  `check_fits` raise `RequestError` (HTTP 400; the message says which knob to turn);
- the blocks are merely busy now: `allocate` returns None and the request waits for a `free`.

Free-list order: `allocate` always takes the lowest free block ids (a min-heap). Which blocks a
request gets therefore depends only on the set of free blocks, never on the order they were
freed, and a lightly loaded pool stays packed at the low end.

Sequences of one request (n > 1, best_of) share its prompt's full blocks: `fork` gives each
a table that starts with the leader's first `num_shared` block ids (reference-counted: a
block goes back to the free list when its last table is freed) and continues with blocks of
its own. Shared blocks are only read after the prefill (decodes write past the prompt), so
no copy-on-write is needed; the prompt's last, partial block is the fork's own (the shard
copies its contents).

Worked example (block_size 4, 8 blocks): `allocate("a", 6)` -> blocks (0, 1), capacity 8;
`allocate("b", 9)` -> (2, 3, 4); `free("a")`; `allocate("c", 12)` -> (0, 1, 5);
`c.slot(9)` = block_ids[9 // 4] * 4 + 9 % 4 = 5 * 4 + 1 = 21.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eaas.errors import ConfigError, RequestError

if TYPE_CHECKING:
    import torch

    from eaas.config import CacheConfig
    from eaas.model.config import ModelConfig

__all__ = ["BlockAllocator", "BlockTable", "kv_cache_bytes_per_block", "num_blocks_for"]

_GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class BlockTable:
    """The blocks reserved for one request, in position order.

    block_ids: physical block ids; logical block i (positions i*block_size ..
    (i+1)*block_size - 1) lives in physical block block_ids[i].
    """

    request_id: str
    block_ids: tuple[int, ...]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def capacity(self) -> int:
        """Tokens this table can hold (num_blocks * block_size)."""
        return len(self.block_ids) * self.block_size

    def slot(self, position: int) -> int:
        """The cache slot of token `position` (0-based within the request).

        Raises IndexError outside 0 <= position < capacity.
        """
        if not 0 <= position < self.capacity:
            raise IndexError(f"position {position} is outside request {self.request_id!r}'s "
                             f"{self.capacity} reserved tokens")
        return self.block_ids[position // self.block_size] * self.block_size + \
            position % self.block_size

    def slots(self, start: int, stop: int) -> list[int]:
        """`[slot(p) for p in range(start, stop)]`: the slot mapping of a prefill chunk."""
        if not 0 <= start <= stop <= self.capacity:
            raise IndexError(f"positions [{start}, {stop}) are outside request "
                             f"{self.request_id!r}'s {self.capacity} reserved tokens")
        b = self.block_size
        return [self.block_ids[p // b] * b + p % b for p in range(start, stop)]


class BlockAllocator:
    """A free list over physical blocks first_block_id .. first_block_id + num_blocks - 1 and
    the block table of every live request. Not thread-safe: one owner (the shard) calls it.

    first_block_id keeps lower ids out of the pool: with 1, block 0 stays the device pool's
    scratch block (eaas.model.kv_cache.SCRATCH_BLOCK), which then has num_blocks + 1 blocks.
    All counts (num_blocks, num_free, usage) are of allocatable blocks only.
    """

    def __init__(self, num_blocks: int, block_size: int, *, first_block_id: int = 0) -> None:
        for name, v, lo in (("num_blocks", num_blocks, 1), ("block_size", block_size, 1),
                            ("first_block_id", first_block_id, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"BlockAllocator {name}={v!r} is not allowed: an integer >= {lo}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block_id = first_block_id
        # a min-heap (a sorted list is one)
        self._free: list[int] = list(range(first_block_id, first_block_id + num_blocks))
        self._tables: dict[str, BlockTable] = {}
        self._shared: dict[int, int] = {}  # block id -> tables holding it beyond the first

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 .. 1.0."""
        return self.num_used / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens!r} is not allowed: an integer >= 0")
        return -(-num_tokens // self.block_size)

    # ---- requests --------------------------------------------------------------------------
    def check_fits(self, num_tokens: int, *, forks: int = 0, num_shared: int = 0) -> None:
        """Raise RequestError if `num_tokens` could never fit, even in an empty pool (with
        `forks` more sequences sharing the first `num_shared` blocks: see `fork`)."""
        need = self.blocks_for(num_tokens)
        need += forks * (need - num_shared)
        if need > self.num_blocks:
            raise RequestError(
                f"request needs {need} blocks of {self.block_size} tokens ({num_tokens} tokens) "
                f"but the KV cache has only {self.num_blocks} blocks; lower max_tokens or raise "
                f"cache.num_blocks / cache.gpu_memory_utilization")

    def can_allocate(self, num_tokens: int) -> bool:
        """True if `allocate(_, num_tokens)` would succeed now."""
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> BlockTable | None:
        """Reserve ceil(num_tokens / block_size) blocks (the lowest free ids) for `request_id`.

        Returns its BlockTable, or None if the blocks are busy now (nothing is reserved; retry
        after a `free`). Raises RequestError if the request needs more blocks than the whole
        pool (it would wait forever), ValueError if `request_id` already holds blocks.
        A request of 0 tokens gets an empty table.
        """
        if request_id in self._tables:
            raise ValueError(f"request {request_id!r} already holds "
                             f"{self._tables[request_id].num_blocks} KV blocks; free it first")
        self.check_fits(num_tokens)
        need = self.blocks_for(num_tokens)
        if need > len(self._free):
            return None
        ids = tuple(heapq.heappop(self._free) for _ in range(need))
        table = BlockTable(request_id, ids, self.block_size)
        self._tables[request_id] = table
        return table

    def fork(self, parent_id: str, child_ids: list[str], num_tokens: int,
             num_shared: int) -> list[BlockTable] | None:
        """Tables for `child_ids` of `num_tokens` tokens each, sharing the first `num_shared`
        blocks of `parent_id`'s table; all or nothing (None: not enough free blocks now).

        Example (block_size 4): parent (0, 1, 2) holds a 9-token prompt; fork(parent, ["c"],
        12, 2) -> c = (0, 1, 3): blocks 0 and 1 shared, 3 its own (c's copy of block 2's one
        prompt token goes there).
        """
        parent = self._tables[parent_id]
        need = self.blocks_for(num_tokens)
        most = min(need, parent.num_blocks)
        if not 0 <= num_shared <= most:
            raise ValueError(f"num_shared={num_shared} is not allowed: 0..{most}")
        own = need - num_shared
        if own * len(child_ids) > len(self._free):
            return None
        shared = parent.block_ids[:num_shared]
        tables = []
        for cid in child_ids:
            if cid in self._tables:
                raise ValueError(f"request {cid!r} already holds KV blocks; free it first")
            ids = shared + tuple(heapq.heappop(self._free) for _ in range(own))
            for b in shared:
                self._shared[b] = self._shared.get(b, 0) + 1
            self._tables[cid] = table = BlockTable(cid, ids, self.block_size)
            tables.append(table)
        return tables

    def free(self, request_id: str) -> int:
        """Give `request_id`'s blocks back (a shared block once its last table is freed);
        returns how many blocks its table held. Idempotent: an unknown or already freed id
        frees nothing and returns 0."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return 0
        for b in table.block_ids:
            refs = self._shared.get(b, 0)
            if refs:
                if refs == 1:
                    del self._shared[b]
                else:
                    self._shared[b] = refs - 1
            else:
                heapq.heappush(self._free, b)
        return table.num_blocks

    def table(self, request_id: str) -> BlockTable | None:
        """The live table of `request_id`, or None."""
        return self._tables.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._tables

    def __len__(self) -> int:
        """Live requests (those holding a table)."""
        return len(self._tables)

    def __repr__(self) -> str:
        return (f"BlockAllocator({self.num_used}/{self.num_blocks} blocks of {self.block_size} "
                f"tokens used, {len(self._tables)} requests)")


# ---- sizing ----------------------------------------------------------------------------------
def kv_cache_bytes_per_block(model_config: ModelConfig, dtype: torch.dtype,
                             block_size: int) -> int:
    """Bytes one block takes over all layers.

    Per token per layer: GQA (qwen3_moe, qwen2_moe, mixtral) caches K and V,
    2 * num_key_value_heads * head_dim elements; MLA (deepseek_v3) caches the compressed latent
    and the shared RoPE key, kv_lora_rank + qk_rope_head_dim elements. Times dtype's size,
    num_hidden_layers and block_size. Sliding-window layers are counted in full.
    """
    c = model_config
    if c.is_mla:
        per_token = c.kv_lora_rank + c.qk_rope_head_dim
    else:
        per_token = 2 * c.num_key_value_heads * c.head_dim
    return per_token * dtype.itemsize * c.num_hidden_layers * block_size


def num_blocks_for(cache_cfg: CacheConfig, model_config: ModelConfig, dtype: torch.dtype,
                   device: str, max_num_seqs: int, max_model_len: int, *,
                   pools_on_device: int = 1) -> int:
    """How many blocks one shard's pool gets.

    - `cache.num_blocks` set: that many.
    - CUDA: (free memory now - (1 - gpu_memory_utilization) * total memory) // bytes per block,
      from `torch.cuda.mem_get_info(device)`. As in vLLM, gpu_memory_utilization is the share
      of the GPU's *total* memory this instance may use; call this after the weights are loaded
      (free memory then already excludes them) and before any pool on `device` is allocated.
      `pools_on_device` pools (shards on one GPU) split that budget evenly.
    - CPU: cache.cpu_kv_cache_space_gib GiB // bytes per block (split the same way).
    In every case capped at max_num_seqs * ceil(max_model_len / block_size), the most that
    max_num_seqs full-length sequences could use. A computed (CUDA/CPU) pool smaller than
    max_num_seqs blocks, one per sequence, is a ConfigError naming the knobs to turn.
    """
    if not isinstance(pools_on_device, int) or pools_on_device < 1:
        raise ValueError(f"pools_on_device={pools_on_device!r} is not allowed: an integer >= 1")
    block_size = cache_cfg.block_size
    per_block = kv_cache_bytes_per_block(model_config, dtype, block_size)
    cap = max_num_seqs * -(-max_model_len // block_size)
    if cache_cfg.num_blocks is not None:
        return min(cache_cfg.num_blocks, cap)
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1.0 - cache_cfg.gpu_memory_utilization) * total
        where = (f"{device}: {free / _GIB:.2f} GiB free of {total / _GIB:.2f} GiB, "
                 f"cache.gpu_memory_utilization={cache_cfg.gpu_memory_utilization} leaves "
                 f"{max(budget, 0) / _GIB:.2f} GiB")
        knobs = "raise cache.gpu_memory_utilization (--gpu-memory-utilization)"
    else:
        budget = cache_cfg.cpu_kv_cache_space_gib * _GIB
        where = f"cache.cpu_kv_cache_space_gib={cache_cfg.cpu_kv_cache_space_gib}"
        knobs = "raise cache.cpu_kv_cache_space_gib"
    num = int(max(budget, 0) // pools_on_device // per_block)
    if num < max_num_seqs:
        share = f" for {pools_on_device} pools" if pools_on_device > 1 else ""
        raise ConfigError(
            f"the KV cache gets {num} blocks of {block_size} tokens ({per_block} bytes each; "
            f"{where}{share}), fewer than scheduler.max_num_seqs={max_num_seqs} (one block per "
            f"sequence); {knobs}, lower scheduler.max_num_seqs, or set cache.num_blocks "
            f"(--num-gpu-blocks-override)")
    return min(num, cap)
