"""Attention with KV caches: GQA (qwen2/3_moe, mixtral) and MLA (deepseek_v3).

`forward` runs one sequence: queries at positions p0..p0+T-1 attend causally to the cached keys
plus their own. `forward_batch` runs several sequences in one call (row-wise work once over all
rows, one-row decode requests in one padded batched attention), equal to `forward` per sequence
within float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from eaas.model import ops
from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ModelConfig

__all__ = ["GQAAttention", "KVCache", "MLAAttention", "load_attention"]


class KVCache:
    """The KV cache of ONE sequence, all layers.

    Per layer it holds a pair of tensors along the sequence: GQA stores
    (K [S, n_kv, d], V [S, n_kv, d]) after RoPE/norm; MLA stores the compressed latent
    (kv [S, kv_lora_rank], k_rope [S, rope_dim]).
    `seq_len` counts tokens every layer has seen (a layer appends in its attention call).

    Storage is preallocated per layer and doubles when full, so `append` copies only the new rows
    (amortized O(1) per token). Hazard: the tensors `append` returns are views of that storage;
    they stay valid until the next `append` or `truncate` of the same layer (a later append may
    write over positions a truncate dropped, or move the storage when it grows).
    """

    MIN_CAPACITY = 8  # rows a layer's storage starts with (at least the first append's rows)

    def __init__(self, num_layers: int) -> None:
        self._k: list[torch.Tensor | None] = [None] * num_layers  # [capacity, ...] per layer
        self._v: list[torch.Tensor | None] = [None] * num_layers
        self._len = [0] * num_layers
        self._sig: list[tuple] = [()] * num_layers  # per layer: (k row shape, v row shape, dtypes)

    @property
    def num_layers(self) -> int:
        return len(self._k)

    def layer_len(self, layer_idx: int) -> int:
        return self._len[layer_idx]

    def capacity(self, layer_idx: int) -> int:
        """Rows layer `layer_idx` can hold before its storage grows (0 before the first append)."""
        k = self._k[layer_idx]
        return 0 if k is None else k.shape[0]

    @property
    def seq_len(self) -> int:
        return min(self._len)

    def append(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k: [T, ...], v: [T, ...] to layer `layer_idx`; returns views of the whole layer's
        (K [S, ...], V [S, ...]), S = layer_len after the append (see the class's hazard note)."""
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k has {k.shape[0]} rows but v has {v.shape[0]}")
        t = k.shape[0]
        kb, vb, n = self._reserve(layer_idx, t, _signature(k, v), k, v)
        kb[n : n + t].copy_(k)
        vb[n : n + t].copy_(v)
        return kb[: n + t], vb[: n + t]

    @staticmethod
    def append_batch(
        caches: Sequence[KVCache],
        layer_idx: int,
        k: torch.Tensor,
        v: torch.Tensor,
        spans: Sequence[tuple[int, int]],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`[c.append(layer_idx, k[s:e], v[s:e]) for c, (s, e) in zip(caches, spans)]` with all
        the copies issued in one call. k: [T, ...], v: [T, ...]; request i owns rows s_i:e_i.
        The caches must be distinct objects (a cache listed twice would get both spans' rows at
        the same positions)."""
        if k.shape[0] != v.shape[0]:
            raise ValueError(f"k has {k.shape[0]} rows but v has {v.shape[0]}")
        sig = _signature(k, v)
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for c, (s, e) in zip(caches, spans):
            kb, vb, n = c._reserve(layer_idx, e - s, sig, k, v)
            dst += (kb[n : n + e - s], vb[n : n + e - s])
            src += (k[s:e], v[s:e])
            out.append((kb[: n + e - s], vb[: n + e - s]))
        if dst:
            torch._foreach_copy_(dst, src)
        return out

    def _reserve(
        self, layer_idx: int, t: int, sig: tuple, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Check rows of signature `sig` (see `_signature`) against the layer's storage, grow it
        (like k / v) if t more rows do not fit, count them as held; returns (K storage,
        V storage, first new row)."""
        n = self._len[layer_idx]
        kb, vb = self._k[layer_idx], self._v[layer_idx]
        if kb is None or vb is None:
            self._sig[layer_idx] = sig
        elif sig != self._sig[layer_idx]:
            raise ValueError(
                f"layer {layer_idx}: rows of (k, v) shape/dtype {sig} do not match the cache's "
                f"{self._sig[layer_idx]}"
            )
        if kb is None or vb is None or n + t > kb.shape[0]:
            cap = max(n + t, 2 * (0 if kb is None else kb.shape[0]), self.MIN_CAPACITY)
            grown_k = k.new_empty((cap, *k.shape[1:]))  # [cap, ...]
            grown_v = v.new_empty((cap, *v.shape[1:]))
            if kb is not None and vb is not None and n:
                grown_k[:n].copy_(kb[:n])
                grown_v[:n].copy_(vb[:n])
            self._k[layer_idx], self._v[layer_idx] = kb, vb = grown_k, grown_v
        self._len[layer_idx] = n + t
        return kb, vb, n

    def truncate(self, seq_len: int) -> None:
        """Drop entries at positions >= seq_len (all layers); keeps the storage for reuse."""
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        self._len = [min(n, seq_len) for n in self._len]


def _signature(k: torch.Tensor, v: torch.Tensor) -> tuple:
    """What every appended row of a layer must share: row shapes and dtypes of k and v."""
    return (k.shape[1:], v.shape[1:], k.dtype, v.dtype, k.device, v.device)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    start: int,
    window: int | None = None,
) -> torch.Tensor:
    """Eager causal attention. q: [n, T, d]; k: [n, S, d]; v: [n, S, dv]; query i sits at start+i
    and sees keys at positions <= start+i (and > start+i-window with a sliding window).

    Returns [T, n * dv]."""
    t, s = q.shape[1], k.shape[1]
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [n, T, S]
    q_pos = torch.arange(start, start + t, device=q.device)[:, None]
    k_pos = torch.arange(s, device=q.device)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden = hidden | (k_pos <= q_pos - window)
    scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [n, T, dv]
    return out.transpose(0, 1).reshape(t, -1)


def _attend(
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


def _positions(
    caches: Sequence[KVCache],
    spans: Sequence[tuple[int, int]],
    layer_idx: int,
    device: torch.device,
) -> torch.Tensor:
    """Every row's position, int64 [T]: request i's rows sit at its cache length before this step
    plus 0..e_i-s_i-1."""
    pos: list[int] = []
    for c, (s, e) in zip(caches, spans):
        p0 = c.layer_len(layer_idx)
        pos.extend(range(p0, p0 + e - s))
    return ops.upload(pos, device)


def _groups(spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Indices of the one-row (decode) requests, batched together, and of the others (prefill)."""
    one = [i for i, (s, e) in enumerate(spans) if e - s == 1]
    many = [i for i, (s, e) in enumerate(spans) if e - s != 1]
    return one, many


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """[S_i, ...] tensors -> [B, max S_i, ...], zero padded at the end."""
    if len(rows) == 1:
        return rows[0][None]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


class _Base:
    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        w: dict[str, torch.Tensor],
        batch_invariant: bool,
    ) -> None:
        self.cfg, self.layer_idx, self.w, self.batch_invariant = cfg, layer_idx, w, batch_invariant
        rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.head_dim
        self.inv_freq, self.rope_factor = ops.rope_inv_freq(
            rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        # on the weights' device once: a per-step copy from host memory syncs the stream
        self.inv_freq = self.inv_freq.to(next(iter(w.values())).device)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return ops.linear(
            x,
            self.w[f"{name}.weight"],
            self.w.get(f"{name}.bias"),
            self.batch_invariant,
        )

    def _cos_sin(self, start: int, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + t, device=x.device)
        return ops.rope_cos_sin(pos, self.inv_freq, self.rope_factor, x.dtype)


class GQAAttention(_Base):
    """Grouped-query attention with RoPE (qwen3_moe adds per-head q_norm/k_norm before RoPE)."""

    def forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x: [T, H] (already normed) -> [T, H]; appends this layer's K/V to `cache`."""
        cfg = self.cfg
        t, d = x.shape[0], cfg.head_dim
        start = cache.layer_len(self.layer_idx)
        q = self._lin(x, "q_proj").view(t, cfg.num_attention_heads, d)  # [T, nh, d]
        k = self._lin(x, "k_proj").view(t, cfg.num_key_value_heads, d)  # [T, nkv, d]
        v = self._lin(x, "v_proj").view(t, cfg.num_key_value_heads, d)
        if cfg.qk_norm:
            q = ops.rms_norm(q, self.w["q_norm.weight"], cfg.rms_norm_eps)
            k = ops.rms_norm(k, self.w["k_norm.weight"], cfg.rms_norm_eps)
        cos, sin = self._cos_sin(start, t, x)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        k_all, v_all = cache.append(self.layer_idx, k, v)  # [S, nkv, d]
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        k_all = k_all.transpose(0, 1).repeat_interleave(rep, dim=0)  # [nh, S, d]
        v_all = v_all.transpose(0, 1).repeat_interleave(rep, dim=0)
        out = _sdpa(
            q.transpose(0, 1), k_all, v_all, d**-0.5, start, cfg.sliding_window(self.layer_idx)
        )  # [T, nh*d]
        return self._lin(out, "o_proj")


    def forward_batch(
        self, x: torch.Tensor, caches: Sequence[KVCache], spans: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """Several sequences at once. x: [T, H] (already normed); request i owns rows
        x[s_i:e_i] (spans tile 0..T in order) and `caches[i]`. Returns [T, H]; the same as
        `forward` per request within float rounding (not bitwise: shapes differ).

        Projections, norms and RoPE run once over all T rows; each request appends its own K/V;
        the one-row (decode) requests attend in one padded batched call, the others one by one.
        """
        cfg, li = self.cfg, self.layer_idx
        t, d, nh, nkv = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        pos = _positions(caches, spans, li, x.device)  # pos: [T]
        q = self._lin(x, "q_proj").view(t, nh, d)  # [T, nh, d]
        k = self._lin(x, "k_proj").view(t, nkv, d)  # [T, nkv, d]
        v = self._lin(x, "v_proj").view(t, nkv, d)
        if cfg.qk_norm:
            q = ops.rms_norm(q, self.w["q_norm.weight"], cfg.rms_norm_eps)
            k = ops.rms_norm(k, self.w["k_norm.weight"], cfg.rms_norm_eps)
        cos, sin = ops.rope_cos_sin(pos, self.inv_freq, self.rope_factor, x.dtype)  # [T, d]
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        kv_all = KVCache.append_batch(caches, li, k, v, spans)  # [(K_i [S_i, nkv, d], V_i)]
        window = cfg.sliding_window(li)
        one, many = _groups(spans)
        out = x.new_empty(t, nh * d)  # [T, nh*d]
        if one:
            rows = ops.upload([spans[i][0] for i in one], x.device)  # [B]
            k_pad = _pad([kv_all[i][0] for i in one]).transpose(1, 2)  # [B, nkv, S, d]
            v_pad = _pad([kv_all[i][1] for i in one]).transpose(1, 2)
            o = _attend(q[rows, None], k_pad, v_pad, d**-0.5, pos[rows, None], window)
            out[rows] = o[:, 0]
        for i in many:
            s, e = spans[i]
            k_i, v_i = kv_all[i]
            o = _attend(
                q[None, s:e], k_i.transpose(0, 1)[None], v_i.transpose(0, 1)[None],
                d**-0.5, pos[None, s:e], window,
            )  # [1, T_i, nh*d]
            out[s:e] = o[0]
        return self._lin(out, "o_proj")


class MLAAttention(_Base):
    """DeepSeek multi-head latent attention; the cache holds the compressed latent and the
    rotated k_rope."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        w: dict[str, torch.Tensor],
        batch_invariant: bool,
    ) -> None:
        super().__init__(cfg, layer_idx, w, batch_invariant)
        self.scale = cfg.head_dim**-0.5
        sc = cfg.rope_scaling
        if sc is not None and sc.get("mscale_all_dim"):
            factor = float(sc["factor"])
            m = 1.0 if factor <= 1 else 0.1 * float(sc["mscale_all_dim"]) * math.log(factor) + 1.0
            self.scale = self.scale * m * m

    def forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x: [T, H] (already normed) -> [T, H]; appends the latent KV to `cache`."""
        cfg = self.cfg
        t, nh = x.shape[0], cfg.num_attention_heads
        nope, rope, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        start = cache.layer_len(self.layer_idx)
        if cfg.q_lora_rank is None:
            q = self._lin(x, "q_proj")
        else:
            qa = ops.rms_norm(
                self._lin(x, "q_a_proj"),
                self.w["q_a_layernorm.weight"],
                cfg.rms_norm_eps,
            )
            q = self._lin(qa, "q_b_proj")
        q = q.view(t, nh, nope + rope)  # [T, nh, nope+rope]
        q_pass, q_rot = q[..., :nope], q[..., nope:]
        ckv = self._lin(x, "kv_a_proj_with_mqa")  # [T, kv_lora + rope]
        kv = ops.rms_norm(
            ckv[:, : cfg.kv_lora_rank],
            self.w["kv_a_layernorm.weight"],
            cfg.rms_norm_eps,
        )  # [T, kv_lora]
        k_rot = ckv[:, cfg.kv_lora_rank :].reshape(t, 1, rope)  # [T, 1, rope]
        cos, sin = self._cos_sin(start, t, x)
        q_rot = ops.apply_rope(q_rot, cos, sin, cfg.rope_interleave)
        k_rot = ops.apply_rope(k_rot, cos, sin, cfg.rope_interleave)
        kv_all, k_rot_all = cache.append(self.layer_idx, kv, k_rot[:, 0])  # [S, kv_lora], [S, rope]
        s = kv_all.shape[0]
        kvb = self._lin(kv_all, "kv_b_proj").view(s, nh, nope + dv)  # [S, nh, nope+dv]
        k_nope, v = kvb[..., :nope], kvb[..., nope:]
        k = torch.cat([k_nope, k_rot_all[:, None, :].expand(s, nh, rope)], dim=-1)  # [S, nh, d]
        q = torch.cat([q_pass, q_rot], dim=-1)  # [T, nh, d]
        out = _sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.scale, start)
        return self._lin(out, "o_proj")


    def forward_batch(
        self, x: torch.Tensor, caches: Sequence[KVCache], spans: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """Several sequences at once; as `GQAAttention.forward_batch` (x: [T, H] normed, spans tile
        0..T, returns [T, H]). The decode requests' latents are padded and expanded by kv_b_proj in
        one call."""
        cfg, li = self.cfg, self.layer_idx
        t, nh = x.shape[0], cfg.num_attention_heads
        nope, rope, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        pos = _positions(caches, spans, li, x.device)  # pos: [T]
        q = self._query(x).view(t, nh, nope + rope)  # [T, nh, nope+rope]
        ckv = self._lin(x, "kv_a_proj_with_mqa")  # [T, kv_lora + rope]
        kv = ops.rms_norm(
            ckv[:, : cfg.kv_lora_rank], self.w["kv_a_layernorm.weight"], cfg.rms_norm_eps
        )  # [T, kv_lora]
        k_rot = ckv[:, cfg.kv_lora_rank :].reshape(t, 1, rope)  # [T, 1, rope]
        cos, sin = ops.rope_cos_sin(pos, self.inv_freq, self.rope_factor, x.dtype)
        q_rot = ops.apply_rope(q[..., nope:], cos, sin, cfg.rope_interleave)
        k_rot = ops.apply_rope(k_rot, cos, sin, cfg.rope_interleave)[:, 0]  # [T, rope]
        q = torch.cat([q[..., :nope], q_rot], dim=-1)  # [T, nh, d]
        lat = KVCache.append_batch(caches, li, kv, k_rot, spans)  # [([S_i, lora], [S_i, rope])]
        one, many = _groups(spans)
        out = x.new_empty(t, nh * dv)  # [T, nh*dv]
        if one:
            rows = ops.upload([spans[i][0] for i in one], x.device)  # [B]
            k, v = self._expand(_pad([lat[i][0] for i in one]), _pad([lat[i][1] for i in one]))
            out[rows] = _attend(q[rows, None], k, v, self.scale, pos[rows, None])[:, 0]
        for i in many:
            s, e = spans[i]
            k, v = self._expand(lat[i][0][None], lat[i][1][None])
            out[s:e] = _attend(q[None, s:e], k, v, self.scale, pos[None, s:e])[0]
        return self._lin(out, "o_proj")

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> q: [T, nh * (nope + rope)]."""
        if self.cfg.q_lora_rank is None:
            return self._lin(x, "q_proj")
        qa = ops.rms_norm(
            self._lin(x, "q_a_proj"), self.w["q_a_layernorm.weight"], self.cfg.rms_norm_eps
        )
        return self._lin(qa, "q_b_proj")

    def _expand(self, kv: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents kv: [B, S, kv_lora], k_rot: [B, S, rope] -> K [B, nh, S, d], V [B, nh, S, dv]."""
        cfg = self.cfg
        b, s, nh, nope = kv.shape[0], kv.shape[1], cfg.num_attention_heads, cfg.qk_nope_head_dim
        kvb = self._lin(kv, "kv_b_proj").view(b, s, nh, nope + cfg.v_head_dim)
        k_rope = k_rot[:, :, None, :].expand(b, s, nh, cfg.qk_rope_head_dim)
        k = torch.cat([kvb[..., :nope], k_rope], dim=-1)  # [B, S, nh, d]
        return k.transpose(1, 2), kvb[..., nope:].transpose(1, 2)


def load_attention(
    ckpt: Checkpoint,
    layer_idx: int,
    dtype: torch.dtype,
    device: str | torch.device,
    batch_invariant: bool = False,
) -> GQAAttention | MLAAttention:
    """Read one layer's attention weights (names relative to `self_attn.`)."""
    from eaas.model.layout import attention_shapes

    cfg = ckpt.config
    prefix = f"model.layers.{layer_idx}.self_attn."
    w: dict[str, torch.Tensor] = {
        name[len(prefix) :]: ckpt.read(name, dtype, device)
        for name in attention_shapes(cfg, layer_idx)
    }
    cls = MLAAttention if cfg.is_mla else GQAAttention
    return cls(cfg, layer_idx, w, batch_invariant)
