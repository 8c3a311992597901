"""The decode peer: a plain-PyTorch, gpt-fast-style decode step of a Qwen3-MoE-shaped model.

What a performance engineer would write without an engine: random bf16 weights made in GPU
memory (seeded; 48 layers ~ 61 GB, never on disk), a static KV cache per layer, and the whole
step (embedding -> every layer -> LM head -> greedy argmax) recorded in ONE CUDA graph per
batch size and replayed per step. A layer is `h = x + attention(norm(x)); out = h + moe(norm(h))`:

  attention  fused q/k/v projection; per-head RMSNorm of q and k; RoPE (rotate-half, theta
             1e6); the new K/V `index_copy_`-ed into the static cache [B, S_max, n_kv, d] at the
             position (a device tensor, so the graph replays at any position); SDPA over the
             whole static cache with an additive mask of the valid length (also on the device),
             the G = n_q / n_kv query heads of one kv head packed as G query rows (no repeat_kv).
  router     softmax top-k renormalised (norm_topk_prob): top-k of the logits, then a softmax
             over those k, which is the same numbers and two kernels fewer.
  experts    sort-based dispatch: `sort` of the flattened topk ids; per-expert row ends `offs`
             (int32, = cumsum(bincount(ids, minlength=E)), computed with `searchsorted` on the
             sorted ids because CUDA `bincount` reads the max back to the host and breaks the
             capture); rows gathered in expert order, then
                 gu  = torch._grouped_mm(rows, w_gate_up.transpose(1, 2), offs=offs)  # [N, 2F]
                 out = torch._grouped_mm(silu(gu[:, :F]) * gu[:, F:], w_down.transpose(1, 2),
                                         offs=offs)                                   # [N, H]
             with w_gate_up [E, 2F, H] and w_down [E, H, F] contiguous (the transposes are
             column-major views, the layout the sm90 CUTLASS kernel takes; all strides are
             multiples of 16 bytes), then un-sorted with `index_copy_` and summed over K with
             the routing weights (one bmm). No host sync anywhere in the step.

The same step also runs eagerly (launch-bound reference). `--smoke` runs on CPU with a tiny
float32 shape, eager only; the CPU torch here (2.13) has `torch._grouped_mm` with a CPU kernel,
so the smoke uses it too ("auto" falls back to a per-expert loop where a build lacks it).

Rates:  ms/step = CUDA-event time of N graph replays (or N eager steps) / N
        tok/s   = B / (ms/step / 1000)
        floor   = bytes a step must read / read bandwidth (see `weight_read_floor`)
        read bandwidth = 4 GiB bf16 tensor / time of `x.sum()`, best of 5
        TTFT    = eager prefill of one prompt (SDPA causal), embedding to first token

    python benchmarks/decode_peer.py [--layers 48] [--vocab 151936] [--batches 1,32,128,256]
                                     [--context 16] [--steps 32] [--extra 32:4096] [--json OUT]
    python benchmarks/decode_peer.py --smoke      # CPU, tiny shape, eager, < 20 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["DecodePeer", "DecodeState", "PeerShape", "main", "measure_peer", "measure_prefill",
           "read_bandwidth", "step_read_bytes", "weight_read_floor"]

ROOT = Path(__file__).resolve().parent.parent
# the tiny CPU shape of --smoke (and of the tests)
SMOKE_SHAPE: dict[str, Any] = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
    num_experts_per_tok=4, moe_intermediate_size=32, num_hidden_layers=2, vocab_size=384)
_EXPERT_IMPLS = ("auto", "grouped_mm", "loop")


@dataclass(frozen=True, slots=True)
class PeerShape:
    """A Qwen3-MoE shape (Hub config.json field names); every layer is an MoE layer."""

    hidden_size: int  # H
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # d
    num_experts: int  # E
    num_experts_per_tok: int  # K
    moe_intermediate_size: int  # F
    num_hidden_layers: int
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "num_hidden_layers", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PeerShape.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"PeerShape.num_attention_heads {self.num_attention_heads} is not "
                             f"a multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"PeerShape.num_experts_per_tok {self.num_experts_per_tok} > "
                             f"num_experts {self.num_experts}")
        if self.head_dim % 2:
            raise ValueError(f"PeerShape.head_dim must be even (RoPE), got {self.head_dim}")

    @classmethod
    def from_dict(cls, shape: dict[str, Any], layers: int | None = None,
                  vocab: int | None = None) -> PeerShape:
        """From a config dict such as eaas.model.tiny.QWEN3_30B_A3B (unknown keys ignored);
        `layers` / `vocab` override num_hidden_layers / vocab_size."""
        known = {k: v for k, v in shape.items() if k in cls.__dataclass_fields__}
        if layers is not None:
            known["num_hidden_layers"] = layers
        if vocab is not None:
            known["vocab_size"] = vocab
        return cls(**known)


# ---- the weight-read floor ------------------------------------------------------------------

def step_read_bytes(shape: dict[str, Any] | PeerShape, batch: int, layers: int | None = None,
                    vocab: int | None = None, *, context: int = 0, itemsize: int = 2) -> float:
    """Bytes one decode step at batch B must read (expected value), weights and KV cache:

        per layer   (n_q + 2 n_kv) d H + H n_q d        q/k/v and o projections
                  + 2 H + 2 d + E H                     norms, q/k norms, router
                  + E_touched(B) * 3 H F                the experts the batch routes to
                  + 2 B context n_kv d                  K and V of `context` positions (0: none)
        once        V H + H + min(B, V) H               LM head, final norm, embedding rows

    all times `itemsize`, with E_touched(B) = E (1 - (1 - K/E)^B): the expected number of
    distinct experts hit when each of B tokens picks K of E uniformly (K at B = 1; ~E at large B).
    """
    s = shape if isinstance(shape, PeerShape) else PeerShape.from_dict(shape, layers, vocab)
    h, nq, nkv, d = s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.head_dim
    e, k, f, v = s.num_experts, s.num_experts_per_tok, s.moe_intermediate_size, s.vocab_size
    touched = e * (1.0 - (1.0 - k / e) ** batch)
    per_layer = ((nq + 2 * nkv) * d * h + h * nq * d + 2 * h + 2 * d + e * h
                 + touched * 3 * h * f + 2 * batch * context * nkv * d)
    return itemsize * (s.num_hidden_layers * per_layer + v * h + h + min(batch, v) * h)


def weight_read_floor(shape: dict[str, Any] | PeerShape, batch: int, layers: int, vocab: int,
                      bw_bytes_per_s: float, *, context: int = 0) -> float:
    """ms per decode step if it did nothing but read its weights (bf16) once at `bw_bytes_per_s`:
    `step_read_bytes(...) / bw * 1e3`; attention, norms, router, LM head and embedding rows, plus
    the E (1 - (1 - K/E)^B) experts a batch of B touches per layer. `context` > 0 adds the KV
    cache reads of that many positions (the weights-only floor has context 0)."""
    nbytes = step_read_bytes(shape, batch, layers, vocab, context=context)
    return nbytes / bw_bytes_per_s * 1e3


def read_bandwidth(device: str | torch.device, nbytes: int = 4 << 30, repeats: int = 5) -> float:
    """Device read bandwidth, bytes/s: a bf16 tensor of `nbytes` (4 GiB) / time of `x.sum()`,
    best of `repeats` (as GPU.md measured it). On CPU, use a smaller `nbytes`."""
    dev = torch.device(device)
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=dev)
    x.sum()
    best = math.inf
    for _ in range(repeats):
        best = min(best, _timed(dev, lambda: x.sum()))
    del x
    return nbytes / best


def _timed(dev: torch.device, fn: Any) -> float:
    """Seconds one `fn()` takes on `dev` (CUDA events on a GPU)."""
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- the model ------------------------------------------------------------------------------

@dataclass(slots=True)
class LayerWeights:
    ln1: torch.Tensor  # [H] input_layernorm
    wqkv: torch.Tensor  # [(n_q + 2 n_kv) d, H] q, k, v projections stacked
    qk_norm: torch.Tensor  # [n_q + n_kv, d] q_norm's weight on each q head row, k_norm's on k's
    wo: torch.Tensor  # [H, n_q d]
    ln2: torch.Tensor  # [H] post_attention_layernorm
    w_router: torch.Tensor  # [E, H]
    w_gate_up: torch.Tensor  # [E, 2F, H] gate rows, then up rows (contiguous)
    w_down: torch.Tensor  # [E, H, F] (contiguous)


@dataclass(slots=True)
class DecodeState:
    """Static buffers of one batch: what a captured step reads and writes in place.

    k, v: per layer [B, S_max, n_kv, d] caches; positions >= `pos` are not attended.
    tokens: [B] int64, the tokens the next step feeds (the step overwrites it with its argmax).
    pos: [1] int64, the position of `tokens` (every row at the same position); +1 per step.
    Hazard: a step's returned (next, logits) alias graph memory, overwritten by the next replay.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    tokens: torch.Tensor
    pos: torch.Tensor
    positions: torch.Tensor = field(repr=False)  # [S_max] int64 0..S_max-1, for the mask

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.positions.shape[0]


class DecodePeer:
    """Random-weight Qwen3-MoE model with a capturable decode step and an eager prefill.

    Weights are N(0, gain^2 / fan_in) as eaas.model.tiny's `_random_init` (activations stay
    finite in bf16 through 48 layers; router gain 2.4 spreads tokens over experts), generated
    on `device` in `dtype` from one generator seeded with `seed`.
    experts: "grouped_mm" (torch._grouped_mm), "loop" (one matmul chain per expert present;
    syncs, so not capturable), or "auto" (grouped_mm where torch has it for this device/dtype).
    """

    def __init__(self, shape: PeerShape, device: str | torch.device, *,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 experts: str = "auto") -> None:
        if experts not in _EXPERT_IMPLS:
            raise ValueError(f"experts={experts!r}: allowed {_EXPERT_IMPLS}")
        self.shape, self.device, self.dtype = shape, torch.device(device), dtype
        self.experts = _resolve_experts(experts, self.device, dtype)
        s = shape
        h, nq, nkv, d = s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.head_dim
        e, f = s.num_experts, s.moe_intermediate_size
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*size: int, std: float, mean: float = 0.0) -> torch.Tensor:
            t = torch.randn(size, generator=gen, device=self.device, dtype=dtype).mul_(std)
            return t.add_(mean) if mean else t

        def norm(*size: int) -> torch.Tensor:
            return randn(*size, std=0.1, mean=1.0)

        self.embed = randn(s.vocab_size, h, std=1.0)  # [V, H]
        self.norm = norm(h)  # [H]
        self.lm_head = randn(s.vocab_size, h, std=h ** -0.5)  # [V, H]
        self.layers = []
        for _ in range(s.num_hidden_layers):
            q_norm, k_norm = norm(d), norm(d)
            self.layers.append(LayerWeights(
                ln1=norm(h), wqkv=randn((nq + 2 * nkv) * d, h, std=h ** -0.5),
                qk_norm=torch.cat([q_norm.expand(nq, d), k_norm.expand(nkv, d)]),
                wo=randn(h, nq * d, std=0.5 * (nq * d) ** -0.5), ln2=norm(h),
                w_router=randn(e, h, std=2.4 * h ** -0.5),
                w_gate_up=randn(e, 2 * f, h, std=h ** -0.5),
                w_down=randn(e, h, f, std=0.5 * f ** -0.5)))
        self.inv_freq = 1.0 / s.rope_theta ** (
            torch.arange(0, d, 2, device=self.device, dtype=torch.float32) / d)  # [d/2]
        self.expert_ids = torch.arange(e, device=self.device)  # [E], searchsorted's needles

    # --- state ---------------------------------------------------------------------------
    def new_state(self, batch: int, max_len: int) -> DecodeState:
        """Zeroed caches for `batch` rows of up to `max_len` positions (rounded up to 16, the
        alignment SDPA's masked kernel wants)."""
        s, dev = self.shape, self.device
        max_len = -(-max_len // 16) * 16
        size = (batch, max_len, s.num_key_value_heads, s.head_dim)
        return DecodeState(
            k=[torch.zeros(size, dtype=self.dtype, device=dev) for _ in self.layers],
            v=[torch.zeros(size, dtype=self.dtype, device=dev) for _ in self.layers],
            tokens=torch.zeros(batch, dtype=torch.long, device=dev),
            pos=torch.zeros(1, dtype=torch.long, device=dev),
            positions=torch.arange(max_len, device=dev))

    # --- the step ------------------------------------------------------------------------
    def decode_step(self, st: DecodeState) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy step for every row at position `st.pos`: returns (next [B] int64,
        logits [B, V]); writes K/V at `pos`, then `tokens <- next`, `pos <- pos + 1`.
        No host sync (capturable) unless experts == "loop"."""
        x = F.embedding(st.tokens, self.embed)  # [B, H]
        cos, sin = self._rope(st.pos)  # [1, d] each
        mask = torch.zeros(st.max_len, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill_(st.positions > st.pos, float("-inf")).view(1, 1, 1, -1)
        for lw, kc, vc in zip(self.layers, st.k, st.v):
            h = x + self._attend_one(lw, self._rms(x, lw.ln1), kc, vc, st.pos, cos, sin, mask)
            x = h + self._moe(lw, self._rms(h, lw.ln2))
        logits = self._head(x)  # [B, V]
        nxt = logits.argmax(-1)  # [B]
        st.tokens.copy_(nxt)
        st.pos.add_(1)
        return nxt, logits

    def prefill(self, st: DecodeState, prompts: torch.Tensor, row0: int = 0) -> torch.Tensor:
        """Eager causal prefill of `prompts` [b, P] int64 (positions 0..P-1) into cache rows
        row0..row0+b-1; sets those rows' `tokens` to the greedy next token and returns logits
        [b, V] of the last position. Does not touch `pos` (rows share it: set it to P)."""
        s = self.shape
        b, p = prompts.shape
        nq, nkv, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        x = F.embedding(prompts, self.embed)  # [b, P, H]
        cos, sin = self._rope(torch.arange(p, device=self.device))  # [P, d]
        cos, sin = cos[:, None], sin[:, None]  # [P, 1, d]
        for lw, kc, vc in zip(self.layers, st.k, st.v):
            q, k, v = self._qkv(lw, self._rms(x, lw.ln1), cos, sin)  # [b, P, n_q|n_kv|n_kv, d]
            kc[row0:row0 + b, :p] = k
            vc[row0:row0 + b, :p] = v
            g = nq // nkv  # prefill only: repeat kv heads so SDPA takes its flash kernel
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
                v.repeat_interleave(g, 2).transpose(1, 2), is_causal=True)  # [b, n_q, P, d]
            h = x + F.linear(o.transpose(1, 2).reshape(b, p, nq * d), lw.wo)
            x = h + self._moe(lw, self._rms(h, lw.ln2).view(b * p, -1)).view(b, p, -1)
        logits = self._head(x[:, -1])  # [b, V]
        st.tokens[row0:row0 + b] = logits.argmax(-1)
        return logits

    # --- pieces --------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos [n, d] and signed sin [n, d] (-sin on the first half) at `positions` [n], so that
        rope(x) = x * cos + x.roll(d/2) * sin == x * cos + rotate_half(x) * sin (HF's)."""
        ang = positions.to(torch.float32)[:, None] * self.inv_freq  # [n, d/2]
        cos, sin = ang.cos(), ang.sin()
        return (torch.cat([cos, cos], -1).to(self.dtype),
                torch.cat([-sin, sin], -1).to(self.dtype))

    def _qkv(self, lw: LayerWeights, hn: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hn [..., H] -> q [..., n_q, d], k [..., n_kv, d] (normed, rotated), v [..., n_kv, d]."""
        s = self.shape
        nq, nkv, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        qkv = F.linear(hn, lw.wqkv)  # [..., (n_q + 2 n_kv) d]
        qk = qkv[..., :(nq + nkv) * d].unflatten(-1, (nq + nkv, d))  # [..., n_q + n_kv, d]
        v = qkv[..., (nq + nkv) * d:].unflatten(-1, (nkv, d))  # [..., n_kv, d]
        qk = F.rms_norm(qk, (d,), eps=s.rms_norm_eps) * lw.qk_norm
        qk = qk * cos + qk.roll(d // 2, -1) * sin
        return qk[..., :nq, :], qk[..., nq:, :], v

    def _attend_one(self, lw: LayerWeights, hn: torch.Tensor, kc: torch.Tensor,
                    vc: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """Decode attention of hn [B, H] at position `pos` over the static cache -> [B, H]."""
        s = self.shape
        b = hn.shape[0]
        nq, nkv, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        q, k, v = self._qkv(lw, hn, cos, sin)  # [B, n_q | n_kv | n_kv, d]
        kc.index_copy_(1, pos, k[:, None])
        vc.index_copy_(1, pos, v[:, None])
        qg = q.reshape(b, nkv, nq // nkv, d)  # [B, n_kv, G, d]: a kv head's G q heads as rows
        o = F.scaled_dot_product_attention(qg, kc.transpose(1, 2), vc.transpose(1, 2),
                                           attn_mask=mask)  # [B, n_kv, G, d]
        return F.linear(o.reshape(b, nq * d), lw.wo)

    def _moe(self, lw: LayerWeights, hn: torch.Tensor) -> torch.Tensor:
        """Routed experts of hn [T, H] -> [T, H]."""
        k = self.shape.num_experts_per_tok
        logits = F.linear(hn, lw.w_router)  # [T, E]
        if self.shape.norm_topk_prob:  # softmax over E renormalised over the top k
            top, topk_ids = logits.topk(k, -1)  # [T, K]
            topk_weights = top.softmax(-1, dtype=torch.float32)
        else:
            topk_weights, topk_ids = logits.softmax(-1, dtype=torch.float32).topk(k, -1)
        return self.moe_experts(lw, hn, topk_ids, topk_weights.to(hn.dtype))

    def moe_experts(self, lw: LayerWeights, hn: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor) -> torch.Tensor:
        """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hn[t]) by sort-based dispatch.

        hn [T, H]; topk_ids [T, K] int64 in 0..E-1; topk_weights [T, K] (hn's dtype) -> [T, H].
        Example (K = 2, E = 3): ids [[2, 0], [0, 1]] -> flat [2, 0, 0, 1], sort -> ids
        [0, 0, 1, 2] from flat rows order [1, 2, 3, 0], tokens order // K = [0, 1, 1, 0],
        offs [2, 3, 4] (expert e owns sorted rows offs[e-1]..offs[e]-1).
        """
        t, k = topk_ids.shape
        sorted_ids, order = topk_ids.flatten().sort(stable=True)  # [N = T K] each
        offs = torch.searchsorted(sorted_ids, self.expert_ids, right=True,
                                  out_int32=True)  # [E] == cumsum(bincount(ids, minlength=E))
        rows = hn.index_select(0, order // k)  # [N, H] in expert order
        out = self._expert_ffn(lw, rows, offs)  # [N, H]
        unsorted = torch.empty_like(out).index_copy_(0, order, out)  # row t K + j: (t, j)
        return torch.bmm(topk_weights.view(t, 1, k), unsorted.view(t, k, -1)).view(t, -1)

    def _expert_ffn(self, lw: LayerWeights, rows: torch.Tensor,
                    offs: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(rows)) * up(rows)) with expert e on sorted rows offs[e-1]..offs[e]."""
        f = self.shape.moe_intermediate_size
        if self.experts == "grouped_mm":
            gu = torch._grouped_mm(rows, lw.w_gate_up.transpose(1, 2), offs=offs)  # [N, 2F]
            act = F.silu(gu[:, :f]) * gu[:, f:]  # [N, F]
            return torch._grouped_mm(act, lw.w_down.transpose(1, 2), offs=offs)  # [N, H]
        out = torch.empty_like(rows)
        ends = offs.tolist()  # host sync: the loop is the uncapturable fallback
        for e, (a, b) in enumerate(zip([0] + ends[:-1], ends)):
            if b > a:
                gu = rows[a:b] @ lw.w_gate_up[e].T  # [n, 2F]
                out[a:b] = (F.silu(gu[:, :f]) * gu[:, f:]) @ lw.w_down[e].T
        return out

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], weight, self.shape.rms_norm_eps)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(x, self.norm), self.lm_head)

    # --- CUDA graph ----------------------------------------------------------------------
    def capture(self, st: DecodeState, warmup: int = 3) -> tuple[torch.cuda.CUDAGraph,
                                                                 torch.Tensor, torch.Tensor]:
        """Record one `decode_step(st)` in a CUDA graph -> (graph, next, logits): each
        `graph.replay()` is one step (outputs overwritten in place). Warm-up steps run on a side
        stream first (PyTorch's recipe); `st.tokens` and `st.pos` are restored afterwards."""
        if self.device.type != "cuda" or self.experts == "loop":
            raise RuntimeError(f"capture needs a CUDA device and experts='grouped_mm', got "
                               f"{self.device} / {self.experts!r}")
        tokens, pos = st.tokens.clone(), st.pos.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.decode_step(st)
        torch.cuda.current_stream(self.device).wait_stream(side)
        st.tokens.copy_(tokens)
        st.pos.copy_(pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            nxt, logits = self.decode_step(st)
        st.tokens.copy_(tokens)  # capture records, it does not run: restore anyway
        st.pos.copy_(pos)
        return graph, nxt, logits


def _resolve_experts(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl != "auto":
        return impl
    if not hasattr(torch, "_grouped_mm"):
        return "loop"
    if device.type == "cuda":  # the CUTLASS kernel: bf16 on sm90+
        cap = torch.cuda.get_device_capability(device)
        return "grouped_mm" if dtype == torch.bfloat16 and cap >= (9, 0) else "loop"
    try:  # some CPU builds have the op without a CPU kernel
        w = torch.zeros(1, 16, 8, dtype=dtype, device=device)
        torch._grouped_mm(torch.zeros(2, 8, dtype=dtype, device=device), w.transpose(1, 2),
                          offs=torch.tensor([2], dtype=torch.int32, device=device))
    except (RuntimeError, NotImplementedError):
        return "loop"
    return "grouped_mm"


# ---- measurements ---------------------------------------------------------------------------

def fill_context(peer: DecodePeer, st: DecodeState, context: int, *, seed: int = 0,
                 max_tokens: int = 8192) -> float:
    """Prefill every row with `context` random prompt tokens (rows in chunks of at most
    `max_tokens` tokens); `st.pos` = context. Returns seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, peer.shape.vocab_size, (st.batch, context), generator=gen)
    rows = max(1, max_tokens // context)
    t0 = time.perf_counter()
    for r in range(0, st.batch, rows):
        peer.prefill(st, prompts[r:r + rows].to(peer.device), r)
    st.pos.fill_(context)
    _sync(peer.device)
    return time.perf_counter() - t0


def measure_peer(shape: dict[str, Any], batch: int, context: int, steps: int, layers: int,
                 vocab: int, device: str | torch.device, *, peer: DecodePeer | None = None,
                 seed: int = 0, eager: bool = True, check_steps: int = 4) -> dict[str, Any]:
    """Decode ms/step and tok/s of the peer at `batch` rows after a `context`-token prefill.

    Builds a DecodePeer(shape, layers, vocab) on `device` unless `peer` is given (reuse one
    across calls: 48 layers take ~61 GB). Returns {batch, context, steps, layers, vocab,
    experts, graph_ms, graph_tok_s, eager_ms, eager_tok_s, graph_eq_eager, fill_s}: graph_*
    are None where there is no capture (CPU, experts="loop"), eager_* None with eager=False;
    graph_eq_eager: the graph and the eager step gave the same greedy tokens over
    `check_steps` steps (None if not compared). tok/s = batch / (ms / 1000).
    """
    dev = torch.device(device)
    if context < 1 or steps < 1 or batch < 1:
        raise ValueError(f"measure_peer: batch {batch}, context {context} and steps {steps} "
                         "must be >= 1")
    if peer is None:
        peer = DecodePeer(PeerShape.from_dict(shape, layers, vocab), dev, seed=seed,
                          dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    st = peer.new_state(batch, context + max(steps, check_steps) + 1)
    fill_s = fill_context(peer, st, context, seed=seed)
    tokens0 = st.tokens.clone()

    def reset() -> None:
        st.tokens.copy_(tokens0)
        st.pos.fill_(context)

    def run(fn: Any, n: int) -> float:  # ms per step over n steps
        reset()
        fn()  # one untimed step (first-call costs), then from the same start
        reset()
        return _timed(dev, lambda: [fn() for _ in range(n)]) * 1e3 / n

    def tokens_of(fn: Any) -> list[list[int]]:
        reset()
        out = []
        for _ in range(check_steps):
            fn()
            out.append(st.tokens.tolist())
        return out

    res: dict[str, Any] = {"batch": batch, "context": context, "steps": steps,
                           "layers": peer.shape.num_hidden_layers,
                           "vocab": peer.shape.vocab_size, "experts": peer.experts,
                           "graph_ms": None, "graph_tok_s": None, "eager_ms": None,
                           "eager_tok_s": None, "graph_eq_eager": None, "fill_s": fill_s}
    step = lambda: peer.decode_step(st)  # noqa: E731
    if dev.type == "cuda" and peer.experts == "grouped_mm":
        graph, _, _ = peer.capture(st)
        res["graph_ms"] = run(graph.replay, steps)
        if check_steps:
            res["graph_eq_eager"] = tokens_of(graph.replay) == tokens_of(step)
        del graph
    if eager:
        res["eager_ms"] = run(step, steps)
    for kind in ("graph", "eager"):
        ms = res[f"{kind}_ms"]
        res[f"{kind}_tok_s"] = None if ms is None else batch / (ms / 1e3)
    del st
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def measure_prefill(peer: DecodePeer, prompt_len: int = 2048, repeats: int = 3,
                    seed: int = 0) -> dict[str, Any]:
    """TTFT of the peer: eager prefill (SDPA causal) of one `prompt_len`-token prompt, embedding
    to first greedy token. Returns {prompt_len, ttft_ms (median of `repeats` after a warm-up),
    prefill_tok_s = prompt_len / ttft}."""
    st = peer.new_state(1, prompt_len)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(10, peer.shape.vocab_size, (1, prompt_len), generator=gen)
    prompt = prompt.to(peer.device)
    peer.prefill(st, prompt)
    times = sorted(_timed(peer.device, lambda: peer.prefill(st, prompt)) for _ in range(repeats))
    ms = times[len(times) // 2] * 1e3
    return {"prompt_len": prompt_len, "ttft_ms": ms, "prefill_tok_s": prompt_len / (ms / 1e3)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---- the table ------------------------------------------------------------------------------

def machine_line(dev: torch.device) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if dev.type == "cuda":
        hw = f"1x {torch.cuda.get_device_name(dev)}"
    else:
        hw = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
    return f"{when}; {hw}; torch {torch.__version__}"


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(header: list[str], rows: list[dict[str, Any]]) -> None:
    for line in header:
        print(f"# {line}")
    print("| batch | context | graph ms/step | graph tok/s | eager ms/step | eager tok/s | "
          "weight floor ms | weight+KV floor ms | floor / graph | graph == eager tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = r["floor_ms"] / r["graph_ms"] if r["graph_ms"] else None
        same = {None: "-", True: "yes", False: "NO"}[r["graph_eq_eager"]]
        print(f"| {r['batch']} | {r['context']} | {_fmt(r['graph_ms'])} | "
              f"{_fmt(r['graph_tok_s'], '.0f')} | {_fmt(r['eager_ms'])} | "
              f"{_fmt(r['eager_tok_s'], '.0f')} | {r['floor_ms']:.2f} | {r['floor_kv_ms']:.2f} | "
              f"{_fmt(ratio)} | {same} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny float32 shape, eager only")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 48)")
    ap.add_argument("--vocab", type=int, default=None, help="vocab size (default 151936)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,32,128,256)")
    ap.add_argument("--context", type=int, default=None, help="prompt tokens per row before "
                    "the timed steps (default 16)")
    ap.add_argument("--extra", default=None, help="more BATCH:CONTEXT rows, comma list "
                    "(default 32:4096; '' for none)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 32)")
    ap.add_argument("--prefill", type=int, default=None,
                    help="TTFT prompt length (default 2048; 0: skip)")
    ap.add_argument("--experts", default="auto", choices=_EXPERT_IMPLS)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    smoke = args.smoke

    def pick(value: Any, full: Any, tiny: Any) -> Any:
        return value if value is not None else (tiny if smoke else full)

    if smoke:
        dev, dtype, base = torch.device("cpu"), torch.float32, SMOKE_SHAPE
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke on CPU")
        sys.path.insert(0, str(ROOT))
        from eaas.model.tiny import QWEN3_30B_A3B

        dev, dtype, base = torch.device("cuda:0"), torch.bfloat16, QWEN3_30B_A3B
    shape = PeerShape.from_dict(base, pick(args.layers, 48, None), pick(args.vocab, 151936, None))
    batches = [int(b) for b in pick(args.batches, "1,32,128,256", "1,4,8").split(",")]
    context, steps = pick(args.context, 16, 6), pick(args.steps, 32, 4)
    extra = pick(args.extra, "32:4096", "2:24")
    pairs = [(b, context) for b in batches]
    pairs += [(int(b), int(c)) for b, c in (p.split(":") for p in extra.split(",") if p)]
    prefill_len = pick(args.prefill, 2048, 32)

    t0 = time.perf_counter()
    peer = DecodePeer(shape, dev, dtype=dtype, seed=args.seed, experts=args.experts)
    _sync(dev)
    build_s = time.perf_counter() - t0
    bw_bytes = (4 << 30) if dev.type == "cuda" else (64 << 20)
    bw = read_bandwidth(dev, bw_bytes)
    ttft = measure_prefill(peer, prefill_len, seed=args.seed) if prefill_len else None
    rows = []
    for b, c in pairs:
        r = measure_peer({}, b, c, steps, shape.num_hidden_layers, shape.vocab_size, dev,
                         peer=peer, seed=args.seed, eager=not args.no_eager)
        r["floor_ms"] = weight_read_floor(shape, b, shape.num_hidden_layers, shape.vocab_size,
                                          bw)
        r["floor_kv_ms"] = weight_read_floor(shape, b, shape.num_hidden_layers,
                                             shape.vocab_size, bw, context=c)
        print(f"# measured: batch {b} context {c}: graph {_fmt(r['graph_ms'])} ms, eager "
              f"{_fmt(r['eager_ms'])} ms", flush=True)
        rows.append(r)
    s = shape
    command = "python benchmarks/decode_peer.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv)
    header = [
        f"decode_peer{' --smoke' if smoke else ''}  {machine_line(dev)}",
        f"command: {command.strip()}",
        f"qwen3_moe-shaped peer, random {str(dtype).removeprefix('torch.')} weights (seed "
        f"{args.seed}, made on {dev} in {build_s:.1f} s): H={s.hidden_size} heads="
        f"{s.num_attention_heads}/{s.num_key_value_heads}x{s.head_dim} E={s.num_experts} "
        f"K={s.num_experts_per_tok} F={s.moe_intermediate_size} layers={s.num_hidden_layers} "
        f"vocab={s.vocab_size}; experts by {peer.experts}; SDPA over the static cache",
        f"read bandwidth {bw / 1e12:.3f} TB/s (bf16 x.sum() over {bw_bytes / 2**30:g} GiB, "
        "best of 5)",
        "ms/step = CUDA-event (CPU: wall) time of N graph replays or N eager steps / N, "
        f"N = {steps}; tok/s = B / (ms/step / 1000); each row prefilled `context` tokens first",
        "weight floor = bytes of bf16 weights a step reads / read bandwidth, experts touched per "
        "layer E(1-(1-K/E)^B); weight+KV floor adds 2*B*context*n_kv*d*2 bytes per layer",
    ]
    if ttft:
        header.append(f"TTFT (eager prefill, SDPA causal, one {ttft['prompt_len']}-token "
                      f"prompt, median of 3): {ttft['ttft_ms']:.2f} ms "
                      f"({ttft['prefill_tok_s']:.0f} prompt tok/s)")
    print_table(header, rows)
    result = {"machine": machine_line(dev), "command": command.strip(),
              "shape": {f: getattr(s, f) for f in s.__dataclass_fields__},
              "read_bandwidth_bytes_per_s": bw, "build_s": build_s, "ttft": ttft, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
