"""eaas.model: Hugging Face MoE checkpoints (qwen3_moe, qwen2_moe, mixtral, deepseek_v3), read
lazily, and a plain pure-torch reference forward built from separately callable pieces."""

from __future__ import annotations

from eaas.model.attention import KVCache
from eaas.model.checkpoint import Checkpoint
from eaas.model.config import ARCHS, ModelConfig
from eaas.model.moe import MLP, ExpertBank, Router, combine_experts
from eaas.model.ops import linear
from eaas.model.reference import DecoderLayer, ReferenceModel
from eaas.model.tiny import make_random, make_tiny
from eaas.model.tokenizer import Tokenizer

__all__ = [
    "ARCHS",
    "MLP",
    "Checkpoint",
    "DecoderLayer",
    "ExpertBank",
    "KVCache",
    "ModelConfig",
    "ReferenceModel",
    "Router",
    "Tokenizer",
    "combine_experts",
    "linear",
    "make_random",
    "make_tiny",
]
