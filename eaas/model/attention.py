"""Attention over the paged KV cache: GQA (qwen2/3_moe, mixtral) and MLA (deepseek_v3).

`forward(x, cache, batch)` runs every row of a step at once: projections, norms and RoPE over
all rows, each row's K/V written to its slot, then single-row sequences (decodes) through the
paged decode kernel (`eaas_kernels.paged_decode_gqa` / `paged_decode_mla`: Triton on CUDA, the
references elsewhere) and multi-row sequences (prefill chunks) over their gathered context:
in a few padded groups, one gather and one attention call per group
(`eaas.model.prefill_attention`), or one by one in batch-invariant mode. The decode path reads
no device value on the host, so it can be captured in a CUDA graph.

batch_invariant: every row's result is independent of the other rows. On CUDA the kernels are
(one fixed tile configuration each); on CPU the projections run row by row and each decode row
attends alone over exactly its own context.
"""

from __future__ import annotations

import math

import torch

from eaas.model import ops
from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ModelConfig
from eaas.model.kv_cache import AttentionBatch, PagedKVCache
from eaas.model.prefill_attention import attend_eager, attend_one, attend_sdpa

__all__ = ["GQAAttention", "MLAAttention", "load_attention"]


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
        return ops.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"),
                          self.batch_invariant)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return ops.rms_norm(x, self.w[f"{name}.weight"], self.cfg.rms_norm_eps,
                            self.batch_invariant)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rope_cos_sin(positions, self.inv_freq, self.rope_factor, dtype)  # [T, d]

    def _exact_rows(self, batch: AttentionBatch, bsz: int
                    ) -> list[tuple[int, int, torch.Tensor]] | None:
        """CPU batch-invariant mode: each single-row sequence attends alone over exactly its own
        context (`AttentionBatch.single_contexts`); None on CUDA (the decode kernel is
        batch-invariant there) or when not invariant."""
        if not self.batch_invariant or batch.positions.is_cuda:
            return None
        return batch.single_contexts(bsz)

    def _scatter_single(self, out: torch.Tensor, batch: AttentionBatch, o: torch.Tensor) -> None:
        if batch.single_rows is None:
            out[: o.shape[0]] = o
        else:
            out.index_copy_(0, batch.single_rows, o)

    def _single_q(self, q: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        return q if batch.single_rows is None else q.index_select(0, batch.single_rows)


_ROPE_TABLES: dict[tuple, torch.Tensor] = {}  # one (cos, sin) table per model shape and device


class GQAAttention(_Base):
    """Grouped-query attention with RoPE (qwen3_moe adds per-head q_norm/k_norm before RoPE).

    On CUDA the q, k and v projections are one matmul over their concatenated weights, and the
    q/k norms, RoPE and the K/V cache write are one kernel (`eaas_kernels.rope_cache_write`,
    with a (cos, sin) table per position shared by the layers); elsewhere torch's ops, the
    arithmetic that kernel reproduces rounding for rounding."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, w: dict[str, torch.Tensor],
                 batch_invariant: bool) -> None:
        super().__init__(cfg, layer_idx, w, batch_invariant)
        self._qkv = self._qkv_bias = self._table = None
        weight = w["q_proj.weight"]
        if weight.is_cuda:
            names = ("q_proj", "k_proj", "v_proj")
            self._qkv = torch.cat([w[f"{n}.weight"] for n in names])  # [(nh + 2 nkv) d, H]
            if all(f"{n}.bias" in w for n in names):
                self._qkv_bias = torch.cat([w[f"{n}.bias"] for n in names])
            row = 0
            for n in names:  # the per-projection weights become views of the fused one
                rows = w[f"{n}.weight"].shape[0]
                w[f"{n}.weight"] = self._qkv[row:row + rows]
                row += rows
            key = (cfg.head_dim, cfg.rope_theta, repr(cfg.rope_scaling),
                   cfg.max_position_embeddings, str(weight.device), weight.dtype)
            if key not in _ROPE_TABLES:
                _ROPE_TABLES[key] = ops.rope_table(self.inv_freq, self.rope_factor,
                                                   cfg.max_position_embeddings, weight.dtype,
                                                   weight.device)
            self._table = _ROPE_TABLES[key]

    def _prepare(self, x: torch.Tensor, cache: PagedKVCache, batch: AttentionBatch
                 ) -> torch.Tensor:
        """Projections, q/k norms and RoPE of every row; K/V stored at the rows' slots. x: [T, H]
        -> q [T, nh, d]."""
        cfg, li = self.cfg, self.layer_idx
        t, d, nh, nkv = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        if self._qkv is not None:
            import eaas_kernels

            qkv = ops.linear(x, self._qkv, self._qkv_bias, self.batch_invariant)  # [T, ...]
            q = qkv[:, :nh * d].view(t, nh, d)
            k = qkv[:, nh * d:(nh + nkv) * d].view(t, nkv, d)
            v = qkv[:, (nh + nkv) * d:].view(t, nkv, d)
            qn = self.w["q_norm.weight"] if cfg.qk_norm else None
            kn = self.w["k_norm.weight"] if cfg.qk_norm else None
            n = cache.num_slots
            return eaas_kernels.rope_cache_write(
                q, k, v, batch.positions, batch.slots, self._table, qn, kn, cfg.rms_norm_eps,
                cache.k[li].view(n, nkv, d), cache.v[li].view(n, nkv, d))
        q = self._lin(x, "q_proj").view(t, nh, d)  # [T, nh, d]
        k = self._lin(x, "k_proj").view(t, nkv, d)  # [T, nkv, d]
        v = self._lin(x, "v_proj").view(t, nkv, d)
        if cfg.qk_norm:
            q, k = self._norm(q, "q_norm"), self._norm(k, "k_norm")
        cos, sin = self._cos_sin(batch.positions, x.dtype)
        q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
        cache.write(li, batch.slots, k, v)
        return q

    def forward(self, x: torch.Tensor, cache: PagedKVCache, batch: AttentionBatch
                ) -> torch.Tensor:
        """x: [T, H] (already normed) -> [T, H]; writes this layer's K/V of every row."""
        cfg, li = self.cfg, self.layer_idx
        t, d, nh = x.shape[0], cfg.head_dim, cfg.num_attention_heads
        q = self._prepare(x, cache, batch)
        window, scale = cfg.sliding_window(li), d**-0.5
        exact = self._exact_rows(batch, cache.block_size)
        if exact is None and batch.single_rows is None and not batch.multi:  # decode-only step
            return self._lin(self._decode(q, cache, batch, scale, window).reshape(t, nh * d),
                             "o_proj")
        out = q.new_zeros(t, nh, d)  # [T, nh, d]
        if exact is not None:
            for r, p, ctx in exact:
                kc, vc = cache.gather(li, ctx)  # [p + 1, nkv, d]
                out[r] = attend_one(q[None, r:r + 1], kc, vc, scale, p, window)[0, 0].view(nh, d)
        elif batch.num_single:
            o = self._decode(self._single_q(q, batch), cache, batch, scale, window)
            self._scatter_single(out, batch, o)
        if self.batch_invariant:  # one sequence at a time: padding would change its reductions
            for s, e, p0, ctx in batch.multi:
                kc, vc = cache.gather(li, ctx)  # [p0 + e - s, nkv, d]
                out[s:e] = attend_one(q[None, s:e], kc, vc, scale, p0, window)[0].view(
                    e - s, nh, d)
        else:
            for g in batch.prefill_groups():
                kc, vc = cache.gather(li, g.slots)  # [G, S_max, nkv, d]
                if g.row_span is not None:  # one sequence, unpadded (flash on CUDA)
                    o = attend_one(g.queries(q), kc[0], vc[0], scale, g.start, window)
                else:  # [G, L_max, nh * d]
                    mask = None if g.causal and window is None else g.mask(window, q.dtype)
                    o = attend_sdpa(g.queries(q), kc, vc, scale, mask)
                g.scatter(out, o)
        return self._lin(out.reshape(t, nh * d), "o_proj")

    def _decode(self, q: torch.Tensor, cache: PagedKVCache, batch: AttentionBatch, scale: float,
                window: int | None) -> torch.Tensor:
        """q: [B, nh, d] of the single-row sequences -> [B, nh, d] (the paged decode kernel)."""
        import eaas_kernels

        li = self.layer_idx
        return eaas_kernels.paged_decode_gqa(q, cache.k[li], cache.v[li], batch.block_tables,
                                             batch.seq_lens, scale, batch.max_seq_len, window)


class MLAAttention(_Base):
    """DeepSeek multi-head latent attention; the cache holds the normed latent and the rotated
    k_rope. Prefill expands the context's latents through kv_b_proj; decode runs in the absorbed
    form (q_nope folded into the latent space by W_UK, the output lifted by W_UV), so the decode
    kernel reads only the latents."""

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
        nh, nope, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        kvb = w["kv_b_proj.weight"].view(nh, nope + dv, cfg.kv_lora_rank)
        self.w_uk = kvb[:, :nope].transpose(1, 2).contiguous()  # [nh, L, nope]
        self.w_uv = kvb[:, nope:].contiguous()  # [nh, dv, L]

    def forward(self, x: torch.Tensor, cache: PagedKVCache, batch: AttentionBatch
                ) -> torch.Tensor:
        """x: [T, H] (already normed) -> [T, H]; writes the latent KV of every row."""
        cfg, li = self.cfg, self.layer_idx
        t, nh = x.shape[0], cfg.num_attention_heads
        nope, rope, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self._query(x).view(t, nh, nope + rope)  # [T, nh, nope+rope]
        ckv = self._lin(x, "kv_a_proj_with_mqa")  # [T, kv_lora + rope]
        kv = self._norm(ckv[:, : cfg.kv_lora_rank], "kv_a_layernorm")  # [T, kv_lora]
        k_rot = ckv[:, cfg.kv_lora_rank :].reshape(t, 1, rope)  # [T, 1, rope]
        cos, sin = self._cos_sin(batch.positions, x.dtype)
        q_rot = ops.apply_rope(q[..., nope:], cos, sin, cfg.rope_interleave)  # [T, nh, rope]
        k_rot = ops.apply_rope(k_rot, cos, sin, cfg.rope_interleave)[:, 0]  # [T, rope]
        cache.write(li, batch.slots, kv, k_rot)
        out = x.new_zeros(t, nh, dv)  # [T, nh, dv]
        q_pass = q[..., :nope]
        exact = self._exact_rows(batch, cache.block_size)
        if exact is not None:
            for r, p, ctx in exact:
                lat, kr = cache.gather(li, ctx)
                k, v = self._expand(lat[None], kr[None])  # [1, nh, S, d], [1, nh, S, dv]
                qr = torch.cat([q_pass[r:r + 1], q_rot[r:r + 1]], dim=-1)[None]  # [1,1,nh,d]
                pos = torch.tensor([[p]], device=x.device)
                out[r] = attend_eager(qr, k, v, self.scale, pos)[0, 0].view(nh, dv)
        elif batch.num_single:
            import eaas_kernels

            q_lat = self._absorb(self._single_q(q_pass, batch))  # [B, nh, L]
            o = eaas_kernels.paged_decode_mla(
                q_lat, self._single_q(q_rot, batch).contiguous(), cache.k[li], cache.v[li],
                batch.block_tables, batch.seq_lens, self.scale, batch.max_seq_len)  # [B, nh, L]
            self._scatter_single(out, batch, self._lift(o))
        if self.batch_invariant:  # one sequence at a time: padding would change its reductions
            for s, e, p0, ctx in batch.multi:
                lat, kr = cache.gather(li, ctx)
                k, v = self._expand(lat[None], kr[None])
                qs = torch.cat([q_pass[s:e], q_rot[s:e]], dim=-1)[None]  # [1, T_i, nh, d]
                pos = torch.arange(p0, p0 + e - s, device=x.device)[None]
                out[s:e] = attend_eager(qs, k, v, self.scale, pos)[0].view(e - s, nh, dv)
        elif groups := batch.prefill_groups():
            q_all = torch.cat([q_pass, q_rot], dim=-1)  # [T, nh, d]
            for g in groups:  # padded keys sit past every real query: the causal mask hides them
                lat, kr = cache.gather(li, g.slots)  # [G, S_max, kv_lora], [G, S_max, rope]
                k, v = self._expand(lat, kr)  # [G, nh, S_max, d], [G, nh, S_max, dv]
                g.scatter(out, attend_eager(g.queries(q_all), k, v, self.scale, g.q_pos))
        return self._lin(out.reshape(t, nh * dv), "o_proj")

    def _absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope: [B, nh, nope] -> q_lat [B, nh, L] = per head q_nope @ W_UK[h]."""
        if self.batch_invariant and q_nope.is_cuda:  # per head, the batch-invariant matmul
            return torch.stack([ops.linear(q_nope[:, h], self.w_uk[h], None, True)
                                for h in range(q_nope.shape[1])], dim=1)
        return torch.einsum("bhn,hln->bhl", q_nope, self.w_uk)

    def _lift(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat: [B, nh, L] -> [B, nh, dv] = per head o_lat @ W_UV[h]^T."""
        if self.batch_invariant and o_lat.is_cuda:
            return torch.stack([ops.linear(o_lat[:, h], self.w_uv[h], None, True)
                                for h in range(o_lat.shape[1])], dim=1)
        return torch.einsum("bhl,hvl->bhv", o_lat, self.w_uv)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> q: [T, nh * (nope + rope)]."""
        if self.cfg.q_lora_rank is None:
            return self._lin(x, "q_proj")
        return self._lin(self._norm(self._lin(x, "q_a_proj"), "q_a_layernorm"), "q_b_proj")

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
