"""The paged KV cache: one block pool per layer, preallocated, and the per-step attention batch.

Layout (the decode kernels in `eaas_kernels.paged_attention` read it):

    GQA layer:  k, v:      [num_blocks, block_size, num_kv_heads, head_dim]  (after norm + RoPE)
    MLA layer:  kv, k_rope: [num_blocks, block_size, kv_lora_rank], [num_blocks, block_size, rope]

A sequence owns a block table (its block ids, in order); its token at position p sits at slot
`table[p // block_size] * block_size + p % block_size`. Block 0 is the scratch block: it is never
given to a sequence, and rows that must not touch a real sequence (padding rows of a captured
bucket, rows of a request aborted mid-step) write their K/V there.

Example (block_size 4): a sequence with table [7, 2] holds positions 0..7 at slots
28, 29, 30, 31, 8, 9, 10, 11; appending position 5 writes slot 9.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eaas.model import ops
from eaas.model.config import ModelConfig
from eaas.model.prefill_attention import PrefillGroup, plan_prefill

__all__ = ["SCRATCH_BLOCK", "AttentionBatch", "PagedKVCache", "SeqSpan", "SequenceCache"]

SCRATCH_BLOCK = 0  # never allocated to a sequence; padding rows write here


class PagedKVCache:
    """Every layer's block pool. `num_blocks` includes the scratch block."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is scratch), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        if cfg.is_mla:
            shapes = ((cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,))
        else:
            shapes = ((cfg.num_key_value_heads, cfg.head_dim),) * 2
        n = cfg.num_hidden_layers
        self.k = [torch.zeros((num_blocks, block_size, *shapes[0]), dtype=dtype, device=device)
                  for _ in range(n)]
        self.v = [torch.zeros((num_blocks, block_size, *shapes[1]), dtype=dtype, device=device)
                  for _ in range(n)]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows k: [T, ...], v: [T, ...] at slots: int64 [T] (capturable: no host read).
        Idempotent: writing the same rows again leaves the same cache (a replayed step)."""
        self.k[layer].view(self.num_slots, *k.shape[1:]).index_copy_(0, slots, k)
        self.v[layer].view(self.num_slots, *v.shape[1:]).index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K [S, ...], V [S, ...]) at slots: int64 [S]."""
        k, v = self.k[layer], self.v[layer]
        return (k.view(self.num_slots, *k.shape[2:])[slots],
                v.view(self.num_slots, *v.shape[2:])[slots])


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence's part of a step: `num_rows` new tokens at positions start..start+num_rows-1,
    `block_ids` its block table (covering at least start + num_rows positions), or None for rows
    that must pass through without touching any cache (they write to the scratch block)."""

    block_ids: Sequence[int] | None
    start: int
    num_rows: int


@dataclass(slots=True)
class AttentionBatch:
    """What attention needs about one step's T rows, on the model's device.

    positions: int64 [T] each row's position. slots: int64 [T] where each row's K/V is written.
    Single-row sequences (decodes, or one-token prefill chunks) attend through the paged decode
    kernel: `single_rows` int64 [B] their rows (None: every row, in order — a decode-only step),
    `block_tables` int32 [B, max_blocks], `seq_lens` int32 [B] (positions cached after this step;
    0 for a row that attends to nothing). `max_seq_len`: host bound on seq_lens.
    Multi-row sequences (prefill chunks): `multi` holds (row start, row end, first position,
    context slots int64 [first position + rows] on the device), for attention one by one
    (batch-invariant mode); `prefill_groups()` batches them (fast mode).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    single_rows: torch.Tensor | None
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int
    multi: list[tuple[int, int, int, torch.Tensor]]
    num_single: int
    _contexts: list[tuple[int, int, torch.Tensor]] | None = None  # see single_contexts
    # (pad slot, multi on the host) for prefill_groups, and its cached result
    _multi_host: tuple[int, list[tuple[int, int, int, list[int]]]] | None = None
    _groups: list[PrefillGroup] | None = None

    def prefill_groups(self) -> list[PrefillGroup]:
        """The multi-row sequences in padded groups (`eaas.model.prefill_attention`), planned and
        uploaded once per batch (every layer asks); [] for a batch without them."""
        if self._groups is None:
            pad, seqs = self._multi_host or (0, [])
            self._groups = plan_prefill(seqs, pad, self.positions.device) if seqs else []
        return self._groups

    def single_contexts(self, block_size: int) -> list[tuple[int, int, torch.Tensor]]:
        """(row, position, context slots int64 [position + 1]) of each single-row sequence that
        attends to something — on the host, computed once per batch (every layer asks). For
        attention row by row (CPU batch-invariant mode)."""
        if self._contexts is None:
            rows = range(self.num_single) if self.single_rows is None \
                else self.single_rows.tolist()
            out = []
            for r, table, n in zip(rows, self.block_tables.tolist(), self.seq_lens.tolist()):
                if n:
                    slots = [table[p // block_size] * block_size + p % block_size
                             for p in range(n)]
                    out.append((r, n - 1, torch.tensor(slots, dtype=torch.long)))
            self._contexts = out
        return self._contexts

    @classmethod
    def build(cls, spans: Sequence[SeqSpan], block_size: int, device: str | torch.device,
              max_blocks: int | None = None) -> AttentionBatch:
        """The batch of `spans` (rows in span order), uploaded without a host sync.

        max_blocks: width of the block tables (default: the widest sequence's need)."""
        positions: list[int] = []
        slots: list[int] = []
        singles: list[int] = []
        tables: list[list[int]] = []
        lens: list[int] = []
        multi_host: list[tuple[int, int, int, list[int]]] = []
        row = 0
        for sp in spans:
            end = sp.start + sp.num_rows
            if sp.block_ids is None:
                seq_slots = [SCRATCH_BLOCK * block_size] * end
            else:
                need = -(-end // block_size)
                if len(sp.block_ids) < need:
                    raise ValueError(f"a sequence at positions {sp.start}..{end - 1} needs {need} "
                                     f"blocks of {block_size}; its table has "
                                     f"{len(sp.block_ids)}")
                seq_slots = [sp.block_ids[p // block_size] * block_size + p % block_size
                             for p in range(end)]
            positions.extend(range(sp.start, end))
            slots.extend(seq_slots[sp.start:end])
            if sp.num_rows == 1:
                singles.append(row)
                tables.append(list(sp.block_ids or ()))
                lens.append(0 if sp.block_ids is None else end)
            elif sp.num_rows > 1:
                if sp.block_ids is not None:
                    multi_host.append((row, row + sp.num_rows, sp.start, seq_slots))
            row += sp.num_rows
        width = max([len(t) for t in tables] + [1]) if max_blocks is None else max_blocks
        table_rows = [t[:width] + [SCRATCH_BLOCK] * (width - len(t[:width])) for t in tables]
        all_single = len(singles) == row
        up = ops.upload
        tables_t = torch.tensor(table_rows, dtype=torch.int32) if table_rows else \
            torch.zeros((0, width), dtype=torch.int32)  # [B, width]
        return cls(
            positions=up(positions, device), slots=up(slots, device),
            single_rows=None if all_single else up(singles, device),
            block_tables=up(tables_t, device),
            seq_lens=up(lens, device, torch.int32),
            max_seq_len=width * block_size,
            multi=_upload_multi(multi_host, device),
            num_single=len(singles),
            _multi_host=(SCRATCH_BLOCK * block_size, multi_host),
        )


def _upload_multi(multi_host: list[tuple[int, int, int, list[int]]], device: str | torch.device
                  ) -> list[tuple[int, int, int, torch.Tensor]]:
    """`multi` with every context uploaded in one copy (views of it)."""
    if not multi_host:
        return []
    flat = ops.upload([x for *_, sl in multi_host for x in sl], device)
    ctxs = flat.split([len(sl) for *_, sl in multi_host])
    return [(s, e, p0, c) for (s, e, p0, _), c in zip(multi_host, ctxs)]


class SequenceCache:
    """The cache of ONE sequence on a pool of its own: what the single-sequence API
    (`DecoderModel.forward(ids, cache)`, transformers-style tests) uses. `seq_len` counts the
    positions cached so far."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype,
                 device: str | torch.device, block_size: int = 16) -> None:
        need = -(-max_len // block_size)
        self.pool = PagedKVCache(cfg, need + 1, block_size, dtype, device)
        self.block_ids = list(range(1, need + 1))
        self.max_len, self.seq_len = max_len, 0

    def span(self, num_rows: int) -> SeqSpan:
        if self.seq_len + num_rows > self.max_len:
            raise ValueError(f"the sequence would reach {self.seq_len + num_rows} positions; "
                             f"its cache holds {self.max_len}")
        return SeqSpan(self.block_ids, self.seq_len, num_rows)

    def truncate(self, seq_len: int) -> None:
        """Forget positions >= seq_len (they are overwritten by later appends)."""
        if not 0 <= seq_len <= self.seq_len:
            raise ValueError(f"seq_len must be in 0..{self.seq_len}, got {seq_len}")
        self.seq_len = seq_len
