"""Tiny checkpoints shared by the model tests: made by eaas (`make_tiny`) and by transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from eaas.model import ARCHS, make_tiny

# transformers configs for `XForCausalLM(config).save_pretrained()`; they vary the fields make_tiny
# fixes (tied embeddings, q_lora_rank None, rope layout, sparse step, norm_topk_prob).
HF_CONFIGS: dict[str, dict] = {
    "qwen3_moe": {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "intermediate_size": 48,
        "decoder_sparse_step": 2,
        "norm_topk_prob": False,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    },
    "qwen2_moe": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "intermediate_size": 64,
        "norm_topk_prob": True,
        "mlp_only_layers": [0],
    },
    "mixtral": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 40,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
    },
    "deepseek_v3": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "intermediate_size": 64,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "rope_interleave": False,
        "routed_scaling_factor": 1.5,
    },
}


def save_hf_tiny(out: Path, arch: str, seed: int, vocab_size: int, **overrides) -> Path:
    """`XForCausalLM(config).save_pretrained(out)` with HF_CONFIGS[arch] (+ overrides)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, vocab_size=vocab_size, **{**HF_CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with (
        torch.no_grad()
    ):  # give routers / biases / norms non-trivial values (HF inits them to 0 / 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            elif "gate" in name and p.dim() == 2 and p.shape[0] in (1, 8):
                p.normal_(0.0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """tiny_dir(arch, seed=0, source="eaas"|"hf") -> checkpoint directory (cached per session)."""
    root = tmp_path_factory.mktemp("tiny")
    made: dict[tuple[str, int, str], Path] = {}

    def get(arch: str, seed: int = 0, source: str = "eaas") -> Path:
        assert arch in ARCHS
        key = (arch, seed, source)
        if key not in made:
            out = root / f"{arch}-{seed}-{source}"
            ref = make_tiny(out if source == "eaas" else root / f"{arch}-{seed}-tok", arch, seed)
            if source == "hf":
                save_hf_tiny(out, arch, seed, vocab_size=_vocab(ref))
                for f in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copy(ref / f, out / f)
            made[key] = out
        return made[key]

    return get


def _vocab(path: Path) -> int:
    import json

    return json.loads((path / "config.json").read_text())["vocab_size"]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
