"""Prefill attention: the multi-row sequences of a step (prefill chunks) over their gathered
context, batched into a few padded groups.

Per layer each group costs one K/V gather from the paged cache and one attention call, instead
of one of each per sequence (a burst of 256 16-token prompts: 1 call per layer, not 256). The
plan (`plan_prefill`) is built once per step from host lists and cached on the step's
`AttentionBatch`; every layer reads it.

Grouping: sequences sorted by context length (longest first) join the current group while its
padded size stays within 2x its real tokens, for keys (G * S_max <= 2 * sum S) and queries
(G * L_max <= 2 * sum L). Example, sequences as (rows, first position): (16, 0), (16, 0),
(3, 30) have contexts 16, 16, 33; sorted 33, 16, 16: keys 3 * 33 <= 2 * 65, queries
3 * 16 <= 2 * 35, so one group with L_max 16 and S_max 48 (33 rounded up to a multiple of 16,
the alignment of the memory-efficient kernel's mask). A group of one sequence is not padded
and runs the single-sequence call (`attend_one`: flash for a whole prompt or a later chunk); a
group of whole prompts of one length needs no padding nor mask either (`causal`: flash).

Padding: key slots past a sequence's context read the scratch block's slot; query rows past a
sequence's rows repeat its first row at position 0. Causality hides the padded keys from the
real queries (their positions are < the context length); a padding query sees key 0 only, so no
row is fully masked (SDPA returns NaN for those on some backends), and its output is dropped.

Only the fast mode batches: in batch_invariant mode padding would change a row's reduction
lengths, so each sequence attends alone (`attend_one`, `attend_eager`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from eaas.model import ops

__all__ = ["PrefillGroup", "attend_eager", "attend_one", "attend_sdpa", "plan_prefill"]

MAX_PADDING = 2.0  # a group's padded keys (and queries) <= this x its real ones
_KEY_ALIGN = 16  # S_max of a padded group is a multiple of this


@dataclass(slots=True)
class PrefillGroup:
    """G sequences that attend in one call; tensors on the model's device.

    rows: int64 [G, L_max] step rows of each sequence's queries (padding: its first row).
    slots: int64 [G, S_max] cache slots of each sequence's context, positions 0.. (padding: the
    scratch slot). q_pos: int64 [G, L_max] the queries' positions (padding: 0).
    out_index: int64 [N] flat indices into [G * L_max] of the N real queries; out_rows: int64 [N]
    their step rows. row_span: (first row, end row) when G == 1 (no padding: rows, out_* unused
    and None), else None. start: first position of the single sequence (G == 1). causal: every
    sequence is a whole prompt of L_max rows from position 0 (no padding, S_max == L_max).
    """

    slots: torch.Tensor
    q_pos: torch.Tensor
    rows: torch.Tensor | None
    out_index: torch.Tensor | None
    out_rows: torch.Tensor | None
    row_span: tuple[int, int] | None
    start: int = 0
    causal: bool = False
    _masks: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """The step's q: [T, nh, d] -> this group's [G, L_max, nh, d]."""
        if self.row_span is not None:
            s, e = self.row_span
            return q[s:e][None]
        return q[self.rows]

    def scatter(self, out: torch.Tensor, o: torch.Tensor) -> None:
        """Write the real queries' results o: [G, L_max, ...] into out: [T, ...] at their rows."""
        if self.row_span is not None:
            s, e = self.row_span
            out[s:e] = o[0].view(e - s, *out.shape[1:])
            return
        flat = o.reshape(-1, *out.shape[1:])  # [G * L_max, ...]
        out.index_copy_(0, self.out_rows, flat.index_select(0, self.out_index))

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [G, 1, L_max, S_max] in dtype: 0 where key j is visible to the query at
        position p (j <= p, and j > p - window), -inf elsewhere. Built on the device once per
        window and step (every layer asks; SDPA would convert a bool mask at every call)."""
        if (window, dtype) not in self._masks:
            k_pos = torch.arange(self.slots.shape[1], device=self.slots.device)  # [S_max]
            qp = self.q_pos[:, :, None]  # [G, L_max, 1]
            hidden = k_pos > qp  # [G, L_max, S_max]
            if window is not None:
                hidden = hidden | (k_pos <= qp - window)
            add = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
            self._masks[window, dtype] = add.masked_fill_(hidden, float("-inf"))[:, None]
        return self._masks[window, dtype]


def plan_prefill(seqs: Sequence[tuple[int, int, int, Sequence[int]]], pad_slot: int,
                 device: str | torch.device) -> list[PrefillGroup]:
    """Group the multi-row sequences of a step (see the module docstring).

    seqs: (row start, row end, first position, context slots of positions 0..first + rows - 1)
    per sequence, on the host. pad_slot: the scratch block's first slot. All of the groups'
    tensors go up in one host-to-device copy.
    """
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][3]))
    members: list[list[int]] = []
    sum_keys = sum_rows = max_rows = 0
    for i in order:
        n_rows, n_keys = seqs[i][1] - seqs[i][0], len(seqs[i][3])
        if members:
            g = members[-1]
            n, s_max, l_max = len(g) + 1, len(seqs[g[0]][3]), max(max_rows, n_rows)
            if (n * s_max <= MAX_PADDING * (sum_keys + n_keys)
                    and n * l_max <= MAX_PADDING * (sum_rows + n_rows)):
                g.append(i)
                sum_keys, sum_rows, max_rows = sum_keys + n_keys, sum_rows + n_rows, l_max
                continue
        members.append([i])
        sum_keys, sum_rows, max_rows = n_keys, n_rows, n_rows
    parts: list[list[int]] = []  # flattened int64 tensors, uploaded together
    shapes: list[list[tuple[int, ...]]] = []
    causal_groups: list[bool] = []
    for g in members:
        if len(g) == 1:
            s, e, p0, ctx = seqs[g[0]]
            parts += [list(ctx), list(range(p0, p0 + e - s))]
            shapes.append([(1, len(ctx)), (1, e - s)])
            causal_groups.append(False)
            continue
        l_max = max(seqs[i][1] - seqs[i][0] for i in g)
        causal = all(seqs[i][2] == 0 and len(seqs[i][3]) == l_max for i in g)
        s_max = l_max if causal else -(-len(seqs[g[0]][3]) // _KEY_ALIGN) * _KEY_ALIGN
        slots, q_pos, rows, out_index, out_rows = [], [], [], [], []
        for j, i in enumerate(g):
            s, e, p0, ctx = seqs[i]
            slots += list(ctx) + [pad_slot] * (s_max - len(ctx))
            q_pos += list(range(p0, p0 + e - s)) + [0] * (l_max - (e - s))
            rows += list(range(s, e)) + [s] * (l_max - (e - s))
            out_index += range(j * l_max, j * l_max + e - s)
            out_rows += range(s, e)
        parts += [slots, q_pos, rows, out_index, out_rows]
        n = len(g)
        shapes.append([(n, s_max), (n, l_max), (n, l_max), (len(out_rows),), (len(out_rows),)])
        causal_groups.append(causal)
    flat = ops.upload([x for p in parts for x in p], device)
    views = iter(flat.split([len(p) for p in parts]))
    groups = []
    for g, sh, causal in zip(members, shapes, causal_groups):
        t = [next(views).view(shape) for shape in sh]
        if len(g) == 1:
            s, e, p0, _ = seqs[g[0]]
            groups.append(PrefillGroup(t[0], t[1], None, None, None, (s, e), p0))
        else:
            groups.append(PrefillGroup(t[0], t[1], t[2], t[3], t[4], None, causal=causal))
    return groups


def _heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """q [B, Tq, nh, d], k/v [B, S, nkv, d] -> [B, heads, T|S, d] and whether SDPA must group
    the query heads (enable_gqa). 4-D: SDPA's fused CUDA kernels take 4-D inputs only (3-D ones
    fall back to the float32 math kernel, ~6x slower for a 2048-token prompt on an H200)."""
    nh = q.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = kh.shape[1] != nh
    if gqa and q.is_cuda:  # the fused kernels take no enable_gqa (with it CUDA falls back to
        # the math kernel too): repeat the K/V heads, as the captured peer does
        kh = kh.repeat_interleave(nh // kh.shape[1], dim=1)
        vh = vh.repeat_interleave(nh // vh.shape[1], dim=1)
        gqa = False
    return qh, kh, vh, gqa


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                mask: torch.Tensor | None) -> torch.Tensor:
    """A group through `scaled_dot_product_attention`. q: [G, L, nh, d]; k, v: [G, S, nkv, d]
    (nh = nkv * rep: query head h reads kv head h // rep); mask: additive [G, 1, L, S]
    (`PrefillGroup.mask`; the memory-efficient kernel on CUDA), or None for plain causal
    attention of whole prompts, L == S (flash). Returns [G, L, nh * d]."""
    g, tq = q.shape[0], q.shape[1]
    qh, kh, vh, gqa = _heads(q, k, v)
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(g, tq, -1)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int,
               window: int | None) -> torch.Tensor:
    """One sequence through `scaled_dot_product_attention` (flash / memory-efficient kernels on
    CUDA), GQA heads grouped: q [1, Tq, nh, d] at positions start.., k/v [S, nkv, d] of
    positions 0..S-1 -> [1, Tq, nh * d]. A whole prompt from position 0 is plain causal; a later
    chunk sees every key up to its own position (causal aligned to the lower right); a sliding
    window passes its mask: query at p sees keys j <= p (j > p - window)."""
    tq, s = q.shape[1], k.shape[0]
    qh, kh, vh, gqa = _heads(q, k[None], v[None])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if start == 0 and tq == s and window is None:
        out = sdpa(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    elif window is None and q.is_cuda:  # a later chunk: flash with lower-right causal alignment
        # (imported here: torch.nn.attention.bias imports triton, which must not happen before
        # a process picks Triton's mode, e.g. the CPU interpreter)
        from torch.nn.attention.bias import causal_lower_right

        out = sdpa(qh, kh, vh, attn_mask=causal_lower_right(tq, s), scale=scale)
    else:
        q_pos = torch.arange(start, start + tq, device=q.device)[:, None]  # [Tq, 1]
        k_pos = torch.arange(s, device=q.device)[None, :]  # [1, S]
        seen = k_pos <= q_pos
        if window is not None:
            seen = seen & (k_pos > q_pos - window)
        out = sdpa(qh, kh, vh, attn_mask=seen, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(1, tq, -1)  # [1, Tq, nh*d]


def attend_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    window: int | None = None,
) -> torch.Tensor:
    """Eager causal attention over a padded batch of sequences, GQA heads grouped (no repeat).

    q: [B, Tq, nh, d] queries; q_pos: int64 [B, Tq] their positions; k: [B, nkv, S, d] and
    v: [B, nkv, S, dv] keys/values at positions 0..S-1 (nh = nkv * rep: query head h reads kv head
    h // rep). Sequence b's keys past its own length must be padding at positions > q_pos[b], which
    the causal mask hides: query at position p sees keys j <= p (and j > p - window).
    Returns [B, Tq, nh * dv].
    """
    b, tq, nh, d = q.shape
    nkv, s = k.shape[1], k.shape[2]
    rep = nh // nkv
    q = q.view(b, tq, nkv, rep, d).permute(0, 2, 3, 1, 4).reshape(b, nkv, rep * tq, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, nkv, rep*Tq, S]
    k_pos = torch.arange(s, device=q.device)
    qp = q_pos[:, :, None]  # [B, Tq, 1]
    hidden = k_pos > qp  # [B, Tq, S]
    if window is not None:
        hidden = hidden | (k_pos <= qp - window)
    hidden = hidden[:, None, None].expand(b, 1, rep, tq, s).reshape(b, 1, rep * tq, s)
    scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, nkv, rep*Tq, dv]
    out = out.view(b, nkv, rep, tq, -1).permute(0, 3, 1, 2, 4)  # [B, Tq, nkv, rep, dv]
    return out.reshape(b, tq, -1)
