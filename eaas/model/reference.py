"""ReferenceModel: the plain monolithic pure-torch forward, built from separately callable pieces.

The engine's actors call the same pieces (attention_block, router, ExpertBank.forward,
combine_experts, shared_expert) piecewise; `DecoderLayer.forward` chains them the same way, routing
the [T*K] expert rows through ExpertBank.forward exactly as the engine dispatches them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from eaas.model import ops
from eaas.model.attention import GQAAttention, KVCache, MLAAttention, load_attention
from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ModelConfig
from eaas.model.layout import moe_prefix
from eaas.model.moe import MLP, ExpertBank, Router, combine_experts

__all__ = ["DecoderLayer", "ReferenceModel"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _norm(h: torch.Tensor, weight: torch.Tensor, eps: float, batch_invariant: bool) -> torch.Tensor:
    """RMSNorm of h: [T, H]; computed row by row when batch_invariant (a GPU reduction may pick
    its strategy by the number of rows)."""
    if batch_invariant:
        return ops.rowwise(lambda row: ops.rms_norm(row, weight, eps), h)
    return ops.rms_norm(h, weight, eps)


def _check_spans(spans: Sequence[tuple[int, int]], num_caches: int, num_rows: int) -> None:
    """spans must be non-empty, contiguous and cover rows 0..num_rows in order, one per cache."""
    if len(spans) != num_caches:
        raise ValueError(f"got {len(spans)} spans for {num_caches} caches; need one per request")
    at = 0
    for i, (s, e) in enumerate(spans):
        if s != at or e <= s:
            raise ValueError(
                f"span {i} is ({s}, {e}); spans must be non-empty and tile rows 0..{num_rows} in "
                f"order (this one must start at {at})"
            )
        at = e
    if at != num_rows:
        raise ValueError(f"spans cover rows 0..{at} but h has {num_rows} rows")


class DecoderLayer:
    """One decoder layer: attention block, then a dense MLP or router + routed experts
    (+ shared)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        input_norm: torch.Tensor,
        post_norm: torch.Tensor,
        attention: GQAAttention | MLAAttention,
        router: Router | None,
        experts: ExpertBank | None,
        shared: MLP | None,
        dense: MLP | None,
        batch_invariant: bool = False,
    ) -> None:
        self.cfg, self.layer_idx, self.is_moe = cfg, layer_idx, router is not None
        self.batch_invariant = batch_invariant
        self.input_norm, self.post_norm = input_norm, post_norm
        self.attention, self._router, self.experts = attention, router, experts
        self._shared, self._dense = shared, dense

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        layer_idx: int,
        dtype: torch.dtype,
        device: str | torch.device,
        load_experts: bool = True,
        batch_invariant: bool = False,
    ) -> DecoderLayer:
        cfg, base = ckpt.config, f"model.layers.{layer_idx}"
        def rd(n: str) -> torch.Tensor:
            return ckpt.read(n, dtype, device)

        attn = load_attention(ckpt, layer_idx, dtype, device, batch_invariant)
        router = experts = shared = dense = None
        if cfg.is_moe_layer(layer_idx):
            p = moe_prefix(cfg, layer_idx)
            bias = None
            if cfg.scoring == "sigmoid":  # deepseek keeps its router in float32
                gate_w = ckpt.read(f"{p}.gate.weight", torch.float32, device)
                bias = ckpt.read(f"{p}.gate.e_score_correction_bias", torch.float32, device)
            else:
                gate_w = rd(f"{p}.gate.weight")
            router = Router(cfg, gate_w, bias, batch_invariant)
            if cfg.has_shared_expert:
                name = "shared_experts" if cfg.is_mla else "shared_expert"
                gname = f"{p}.shared_expert_gate.weight" if cfg.shared_expert_gate else None
                shared = MLP.load(ckpt, f"{p}.{name}", dtype, device, gname, batch_invariant)
            if load_experts:
                experts = ExpertBank.load(
                    ckpt, layer_idx, range(cfg.num_experts), dtype, device, batch_invariant
                )
        else:
            dense = MLP.load(ckpt, f"{base}.mlp", dtype, device, None, batch_invariant)
        return cls(
            cfg,
            layer_idx,
            rd(f"{base}.input_layernorm.weight"),
            rd(f"{base}.post_attention_layernorm.weight"),
            attn,
            router,
            experts,
            shared,
            dense,
            batch_invariant,
        )

    def attention_block(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """h: [T, H] of one sequence -> h + attention(norm(h)); appends this layer's K/V to
        cache."""
        return h + self.attention.forward(
            ops.rms_norm(h, self.input_norm, self.cfg.rms_norm_eps), cache
        )

    def attention_block_batch(
        self,
        h: torch.Tensor,
        caches: Sequence[KVCache | None],
        spans: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Attention blocks of several sequences in one call.

        h: [T, H], request i's rows are h[s_i:e_i] (spans tile 0..T in order; a prefill request
        owns several rows, a decode request one); caches[i] is its KVCache, or None for a request
        whose rows pass through untouched (aborted, cache dropped). Returns [T, H], the same as
        `torch.cat([attention_block(h[s:e], c) for c, (s, e) in ...])`: bitwise when
        batch_invariant (it then IS that loop: a batched kernel would change rows' bits), within
        float rounding otherwise (row-wise work runs once over all rows, decode attention in one
        padded batched call). Appends this layer's K/V to every live cache.
        """
        _check_spans(spans, len(caches), h.shape[0])
        if self.batch_invariant:
            parts = [
                h[s:e] if c is None else self.attention_block(h[s:e], c)
                for c, (s, e) in zip(caches, spans)
            ]
            return torch.cat(parts) if parts else h
        live = [i for i, c in enumerate(caches) if c is not None]
        if not live:
            return h
        live_caches = [c for c in caches if c is not None]
        if len(live) == len(caches):
            x = ops.rms_norm(h, self.input_norm, self.cfg.rms_norm_eps)  # [T, H]
            return h + self.attention.forward_batch(x, live_caches, spans)
        rows: list[int] = []
        live_spans: list[tuple[int, int]] = []
        n = 0
        for i in live:
            s, e = spans[i]
            rows.extend(range(s, e))
            live_spans.append((n, n + e - s))
            n += e - s
        idx = torch.tensor(rows, dtype=torch.long, device=h.device)  # [T_live]
        h_live = h[idx]  # [T_live, H]
        x = ops.rms_norm(h_live, self.input_norm, self.cfg.rms_norm_eps)
        out = h.clone()
        out[idx] = h_live + self.attention.forward_batch(x, live_caches, live_spans)
        return out

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        """Post-attention RMSNorm. h: [T, H] -> x: [T, H] (row by row when batch_invariant)."""
        return _norm(h, self.post_norm, self.cfg.rms_norm_eps, self.batch_invariant)

    def router(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_ids int64 [T, K], topk_weights float32 [T, K]); final weights."""
        if self._router is None:
            raise ValueError(f"layer {self.layer_idx} is dense; it has no router")
        return self._router(x)

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: [T, H] -> shared-expert output [T, H] (gated for qwen2_moe), or None if none."""
        return None if self._shared is None else self._shared(x)

    def dense_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]; only on dense layers."""
        if self._dense is None:
            raise ValueError(f"layer {self.layer_idx} is an MoE layer; it has no dense MLP")
        return self._dense(x)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The whole FFN part on normed x: [T, H] -> [T, H] (routed + shared, or dense)."""
        if not self.is_moe:
            return self.dense_mlp(x)
        if self.experts is None:
            raise ValueError(
                f"layer {self.layer_idx}: routed experts were not loaded (load_experts=False)"
            )
        topk_ids, topk_weights = self.router(x)  # [T, K]
        t, k = topk_ids.shape
        rows = x.repeat_interleave(k, dim=0)  # [T*K, H]: row t*K + j is token t for slot j
        expert_out = self.experts.forward(rows, topk_ids.reshape(-1)).view(t, k, -1)  # [T, K, H]
        out = combine_experts(expert_out, topk_weights)
        shared = self.shared_expert(x)
        return out if shared is None else out + shared

    def forward(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Monolithic layer: h: [T, H] -> [T, H]."""
        h = self.attention_block(h, cache)
        return h + self.ffn(self.ffn_input(h))


class ReferenceModel:
    """The whole model in plain torch, one sequence at a time. Use `ReferenceModel.load(ckpt)`."""

    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        norm: torch.Tensor,
        lm_head_weight: torch.Tensor,
        batch_invariant: bool,
    ) -> None:
        self.config, self.layers = cfg, layers
        self.embed_weight, self.norm_weight, self.lm_head_weight = embed, norm, lm_head_weight
        self.batch_invariant = batch_invariant

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_experts: bool = True,
        batch_invariant: bool = False,
    ) -> ReferenceModel:
        """Read the model from `ckpt`. load_experts=False skips routed experts (what an attention
        shard loads)."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        cfg = ckpt.config
        embed = ckpt.read("model.embed_tokens.weight", dtype, device)
        layers = [
            DecoderLayer.load(ckpt, i, dtype, device, load_experts, batch_invariant)
            for i in tqdm(
                range(cfg.num_hidden_layers),
                desc=f"loading {ckpt.path.name}",
                unit="layer",
                delay=2.0,
                leave=False,
            )
        ]
        head = embed if cfg.tie_word_embeddings else ckpt.read("lm_head.weight", dtype, device)
        return cls(
            cfg, embed, layers, ckpt.read("model.norm.weight", dtype, device), head, batch_invariant
        )

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def embed(self, input_ids: torch.Tensor, host_ids: list[int] | None = None) -> torch.Tensor:
        """input_ids: int64 [T] -> [T, H]. host_ids: the same ids as a host list, checked there
        instead (no device sync to read min/max of a GPU tensor)."""
        if host_ids is not None:
            bad = bool(host_ids) and (min(host_ids) < 0 or max(host_ids) >= self.config.vocab_size)
        else:
            bad = bool(input_ids.numel()) and (
                int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size)
        if bad:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return self.embed_weight[input_ids.to(self.embed_weight.device)]

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm. h: [T, H] -> [T, H] (row by row when batch_invariant)."""
        return _norm(h, self.norm_weight, self.config.rms_norm_eps, self.batch_invariant)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """h: [T, H] (final-normed) -> logits float32 [T, V]."""
        return ops.linear(h, self.lm_head_weight, None, self.batch_invariant).to(torch.float32)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids: int64 [T] at positions cache.seq_len + arange(T) -> logits float32 [T, V]."""
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer.forward(h, cache)
        return self.lm_head(self.final_norm(h))

    def generate_greedy(
        self, prompt_ids: Sequence[int], max_new_tokens: int, stop_token_ids: Sequence[int] = ()
    ) -> list[int]:
        """Prefill `prompt_ids`, then decode token by token; returns the new tokens only."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        cache = self.new_cache()
        device = self.embed_weight.device
        logits = self.forward(
            torch.tensor(list(prompt_ids), dtype=torch.long, device=device), cache
        )
        out: list[int] = []
        while len(out) < max_new_tokens:
            tok = int(logits[-1].argmax())
            out.append(tok)
            if tok in stop_token_ids or len(out) == max_new_tokens:
                break
            logits = self.forward(torch.tensor([tok], dtype=torch.long, device=device), cache)
        return out
