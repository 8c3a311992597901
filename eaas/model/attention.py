"""Attention for one sequence with its KV cache: GQA (qwen2/3_moe, mixtral) and MLA (deepseek_v3).

Attention runs one sequence at a time: the engine loops over sequences for attention and batches the
rest. Queries at positions p0..p0+T-1 attend causally to the cached keys plus their own.
"""

from __future__ import annotations

import math

import torch

from eaas.model import ops
from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ModelConfig

__all__ = ["GQAAttention", "KVCache", "MLAAttention", "load_attention"]


class KVCache:
    """The KV cache of ONE sequence, all layers.

    Per layer it holds a pair of tensors along the sequence: GQA stores (K [S, n_kv, d], V [S, n_kv, d])
    after RoPE/norm; MLA stores the compressed latent (kv [S, kv_lora_rank], k_rope [S, rope_dim]).
    `seq_len` counts tokens every layer has seen (a layer appends in its attention call).
    """

    def __init__(self, num_layers: int) -> None:
        self._k: list[torch.Tensor | None] = [None] * num_layers
        self._v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self._k)

    def layer_len(self, layer_idx: int) -> int:
        k = self._k[layer_idx]
        return 0 if k is None else k.shape[0]

    @property
    def seq_len(self) -> int:
        return min(self.layer_len(i) for i in range(self.num_layers))

    def append(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v ([T, ...]) to layer `layer_idx`; returns the whole layer's (K, V)."""
        old_k, old_v = self._k[layer_idx], self._v[layer_idx]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k, k]), torch.cat([old_v, v])
        self._k[layer_idx], self._v[layer_idx] = k, v
        return k, v

    def truncate(self, seq_len: int) -> None:
        """Drop entries at positions >= seq_len (all layers)."""
        for i in range(self.num_layers):
            k, v = self._k[i], self._v[i]
            if k is not None and v is not None:
                self._k[i], self._v[i] = k[:seq_len], v[:seq_len]


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


class MLAAttention(_Base):
    """DeepSeek multi-head latent attention; the cache holds the compressed latent and rotated k_rope."""

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
