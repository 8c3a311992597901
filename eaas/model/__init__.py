"""eaas.model: Hugging Face MoE checkpoints (qwen3_moe, qwen2_moe, mixtral, deepseek_v3), read
lazily; the decoder model the shards run (its layers run through the dataflow executor) and
its paged KV cache."""

from __future__ import annotations

from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ARCHS, ModelConfig
from eaas.model.moe import MLP, ExpertBank, Router, combine_experts
from eaas.model.ops import linear
from eaas.model.decoder import DecoderLayer, DecoderModel, bank_experts
from eaas.model.kv_cache import AttentionBatch, PagedKVCache, SeqSpan, SequenceCache
from eaas.model.tiny import make_random, make_tiny
from eaas.model.tokenizer import Tokenizer

__all__ = [
    "ARCHS",
    "MLP",
    "Checkpoint",
    "DecoderLayer",
    "ExpertBank",
    "AttentionBatch",
    "PagedKVCache",
    "SeqSpan",
    "SequenceCache",
    "bank_experts",
    "ModelConfig",
    "DecoderModel",
    "Router",
    "Tokenizer",
    "combine_experts",
    "linear",
    "make_random",
    "make_tiny",
]
