"""make_tiny: a tiny random-weight checkpoint of a supported architecture, in the Hugging Face format.

Writes config.json (Hub-style field names), model.safetensors (per-expert tensor names, as Hub
checkpoints have them), a byte-level BPE tokenizer.json trained offline on a small built-in text, and
generation_config.json. Needs neither transformers nor the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from eaas.errors import ConfigError
from eaas.model import layout
from eaas.model.config import ARCHS, ModelConfig

__all__ = ["make_tiny", "tiny_config", "train_tokenizer"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>")
TOKENIZER_VOCAB = 384

_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Experts are stateless services; attention shards call them asynchronously and combine their answers.
When an expert server fails, the router sends its tokens to a replica and the model keeps serving.
Mixture of experts models route every token to a few experts chosen by a small gating network.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is.
Once upon a time there was a little robot who liked to count: one, two, three, four, five, six.
The cat sat on the mat. The dog sat on the log. The bird sang in the tree while the sun was rising.
Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2025 and symbols + - * / = ( ) [ ] { } < > ! ? , . ; :
def add(a, b):\n    return a + b\nprint(add(2, 3))\n
Water boils at one hundred degrees. Ice melts in the warm spring. Rivers run down to the sea.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
"""


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on the built-in text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines() * 4, trainer)
    return tok


def tiny_config(arch: str, vocab_size: int, eos_token_id: int) -> dict[str, Any]:
    """The config.json dict of a tiny `arch` model (Hub field names)."""
    common: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "qwen3_moe":
        return {
            **common,
            "architectures": ["Qwen3MoeForCausalLM"],
            "num_hidden_layers": 3,
            "head_dim": 16,
            "num_experts": 8,
            "moe_intermediate_size": 32,
            "intermediate_size": 64,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "sliding_window": None,
            "use_sliding_window": False,
        }
    if arch == "qwen2_moe":
        return {
            **common,
            "architectures": ["Qwen2MoeForCausalLM"],
            "num_hidden_layers": 2,
            "num_experts": 8,
            "moe_intermediate_size": 32,
            "intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "qkv_bias": True,
            "sliding_window": None,
            "use_sliding_window": False,
            "max_window_layers": 2,
        }
    if arch == "mixtral":
        return {
            **common,
            "architectures": ["MixtralForCausalLM"],
            "num_hidden_layers": 2,
            "num_local_experts": 8,
            "intermediate_size": 48,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }
    if arch == "deepseek_v3":
        return {
            **common,
            "architectures": ["DeepseekV3ForCausalLM"],
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "intermediate_size": 96,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            "attention_bias": False,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
        }
    raise ValueError(f"arch {arch!r} is not one of {ARCHS}")


def _tensors(cfg: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights: N(0, 0.08) matrices, norms ~1, embeddings N(0, 1), routers N(0, 0.3)."""

    def randn(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    specs = dict(layout.non_expert_shapes(cfg))
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            for e in range(cfg.num_experts):
                for key, name in layout.expert_names(cfg, layer, e).items():
                    f, h = cfg.moe_intermediate_size, cfg.hidden_size
                    specs[name] = (h, f) if key == "down" else (f, h)
    out: dict[str, torch.Tensor] = {}
    for name, shape in sorted(specs.items()):
        if name.endswith("norm.weight"):
            out[name] = 1.0 + randn(shape, 0.1)
        elif name == "model.embed_tokens.weight":
            out[name] = randn(shape, 1.0)
        elif name.endswith((".bias", "e_score_correction_bias")):
            out[name] = randn(shape, 0.05)
        elif name.endswith("gate.weight"):
            out[name] = randn(shape, 0.3)  # router: well separated expert choices
        elif ".self_attn." in name:
            out[name] = randn(shape, 0.2)  # strong attention: the context shapes the next token
        else:
            out[name] = randn(shape, 0.08)
    if "lm_head.weight" in out:
        # Subtract each token's own (unit-rms) embedding from its output row: the current token's
        # logit drops well below the rest, so greedy decoding does not lock onto one repeated token.
        emb = out["model.embed_tokens.weight"]
        out["lm_head.weight"] -= 0.1 * emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    return {k: v.contiguous() for k, v in out.items()}


def make_tiny(out_dir: str | Path, arch: str, seed: int = 0) -> Path:
    """Write a tiny random `arch` checkpoint into `out_dir` (created if needed); returns its path."""
    from safetensors.torch import save_file

    if arch not in ARCHS:
        raise ConfigError(f"make_tiny: arch {arch!r} is not one of {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    raw = tiny_config(arch, tok.get_vocab_size(with_added_tokens=True), eos)
    cfg = ModelConfig.from_dict(raw)
    gen = torch.Generator().manual_seed(seed)
    save_file(_tensors(cfg, gen), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|endoftext|>",
                "bos_token": None,
                "pad_token": "<|endoftext|>",
                "model_max_length": raw["max_position_embeddings"],
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
        + "\n"
    )
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": None, "eos_token_id": [eos], "do_sample": False}, indent=2)
        + "\n"
    )
    return out
