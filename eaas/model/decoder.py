"""The decoder model the shards run: embedding, decoder layers, final norm, LM head.

A layer is a set of separately callable pieces (attention_block, ffn_input, router, the expert
bank, shared_expert, dense_mlp); how they connect is the layer's dataflow graph, run by the
executor (eaas.dataflow.executor) — the same program here, in the shard's eager step and in the
captured step. `DecoderModel.forward(ids, cache)` is the plain one-sequence forward the tests
compare with transformers; `forward_hidden(ids, cache, batch, experts)` runs a whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from eaas.dataflow.executor import ModelProgram, StepContext, run_sync
from eaas.model import ops
from eaas.model.attention import GQAAttention, MLAAttention, load_attention
from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ModelConfig
from eaas.model.kv_cache import AttentionBatch, PagedKVCache, SequenceCache
from eaas.model.layout import moe_prefix, shared_expert_gate_name, shared_expert_prefix
from eaas.model.moe import MLP, ExpertBank, Router

__all__ = ["DecoderLayer", "DecoderModel", "bank_experts"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bank_experts(layer: DecoderLayer, x: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """The experts step of a model that holds its routed experts (executor `ExpertsStep`):
    x [T, H], topk_ids/topk_weights [T, K] -> combined routed output [T, H]."""
    if layer.experts is None:
        raise ValueError(f"layer {layer.layer_idx}: routed experts were not loaded "
                         "(load_experts=False); this model needs an experts step")
    return layer.experts.routed(x, topk_ids, topk_weights)


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
                shared = MLP.load(ckpt, shared_expert_prefix(cfg, layer_idx), dtype, device,
                                  shared_expert_gate_name(cfg, layer_idx), batch_invariant)
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

    def attention_block(self, h: torch.Tensor, cache: PagedKVCache, batch: AttentionBatch
                        ) -> torch.Tensor:
        """h: [T, H] (every row of the step) -> h + attention(norm(h)); writes this layer's K/V
        of every row to `cache` at `batch.slots`."""
        x = ops.rms_norm(h, self.input_norm, self.cfg.rms_norm_eps, self.batch_invariant)
        return h + self.attention.forward(x, cache, batch)

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        """Post-attention RMSNorm. h: [T, H] -> x: [T, H] (row by row when batch_invariant)."""
        return ops.rms_norm(h, self.post_norm, self.cfg.rms_norm_eps, self.batch_invariant)

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


class DecoderModel:
    """The whole model. Use `DecoderModel.load(ckpt)`; `forward(ids, cache)` runs one sequence,
    `forward_hidden` / `run_layers` a batch of them over a shared paged cache."""

    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        norm: torch.Tensor,
        lm_head_weight: torch.Tensor,
        batch_invariant: bool,
        graph: Any = None,
    ) -> None:
        from eaas.dataflow import default_model_graph

        self.config, self.layers = cfg, layers
        self.embed_weight, self.norm_weight, self.lm_head_weight = embed, norm, lm_head_weight
        self.batch_invariant = batch_invariant
        self.program = ModelProgram(graph or default_model_graph(cfg), cfg.num_hidden_layers)

    @classmethod
    def load(
        cls,
        ckpt: Checkpoint,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_experts: bool = True,
        batch_invariant: bool = False,
        graph: Any = None,
    ) -> DecoderModel:
        """Read the model from `ckpt`. load_experts=False skips routed experts (what an attention
        shard loads when its experts live on servers). graph: the ModelGraph to run (default:
        the architecture's)."""
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
        norm = ckpt.read("model.norm.weight", dtype, device)
        return cls(cfg, embed, layers, norm, head, batch_invariant, graph)

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    def new_cache(self, max_len: int | None = None) -> SequenceCache:
        """A one-sequence cache of `max_len` positions (default: the model's context length)."""
        n = max_len or self.config.max_position_embeddings
        return SequenceCache(self.config, n, self.dtype, self.device)

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
        """Final RMSNorm. h: [T, H] -> [T, H]."""
        return ops.rms_norm(h, self.norm_weight, self.config.rms_norm_eps, self.batch_invariant)

    def lm_head(self, h: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """h: [T, H] (final-normed) -> logits [T, V], float32 (float32=False: in the model's
        dtype, the values before the upcast — enough for an argmax, which the upcast keeps)."""
        logits = ops.linear(h, self.lm_head_weight, None, self.batch_invariant)
        return logits.to(torch.float32) if float32 else logits

    async def run_layers(self, h: torch.Tensor, cache: PagedKVCache, batch: AttentionBatch,
                         experts: Any = bank_experts, before_layer: Any = None) -> torch.Tensor:
        """Every layer's program over h: [T, H] -> [T, H]. `before_layer(i)` runs before layer i
        (the shard's abort check)."""
        step = StepContext(cache, batch, experts)
        for layer, prog in zip(self.layers, self.program.layers):
            if before_layer is not None:
                before_layer(layer.layer_idx)
            h = await prog.run(layer, h, step)
        return h

    def forward_hidden(self, input_ids: torch.Tensor, cache: PagedKVCache,
                       batch: AttentionBatch, experts: Any = bank_experts) -> torch.Tensor:
        """Embedding and every layer, synchronously (experts steps that never wait):
        input_ids int64 [T] -> hidden [T, H] before the final norm."""
        return run_sync(self.run_layers(self.embed_weight[input_ids], cache, batch, experts))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: SequenceCache) -> torch.Tensor:
        """input_ids: int64 [T] at positions cache.seq_len + arange(T) -> logits float32 [T, V]."""
        ids = input_ids.to(self.device)
        h = self.embed(ids)  # checks the ids
        span = cache.span(int(ids.shape[0]))
        batch = AttentionBatch.build([span], cache.pool.block_size, self.device)
        h = run_sync(self.run_layers(h, cache.pool, batch))
        cache.seq_len += int(ids.shape[0])
        return self.lm_head(self.final_norm(h))

    def generate_greedy(
        self, prompt_ids: Sequence[int], max_new_tokens: int, stop_token_ids: Sequence[int] = ()
    ) -> list[int]:
        """Prefill `prompt_ids`, then decode token by token; returns the new tokens only."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        device = self.device
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
