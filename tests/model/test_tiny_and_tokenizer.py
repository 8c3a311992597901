"""make_tiny (deterministic, offline, Hub layout), the tokenizer, ModelConfig's field mapping."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eaas.errors import CheckpointError
from eaas.model import ARCHS, Checkpoint, ModelConfig, Tokenizer, make_tiny


def test_make_tiny_is_deterministic_per_seed(tmp_path):
    a, b, c = (make_tiny(tmp_path / n, "deepseek_v3", s) for n, s in (("a", 5), ("b", 5), ("c", 6)))
    for f in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_make_tiny_sizes(tiny_dir, arch):
    ckpt = Checkpoint.open(tiny_dir(arch))
    cfg = ckpt.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok) == (
        arch,
        64,
        8,
        2,
    )
    assert 2 <= cfg.num_hidden_layers <= 4 and cfg.num_attention_heads == 4
    assert 32 <= cfg.moe_intermediate_size <= 64
    assert 300 <= cfg.vocab_size <= 512 and cfg.vocab_size == ckpt.tokenizer.vocab_size
    if arch == "deepseek_v3":
        assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace) == (2, 1, 1)
        assert (cfg.kv_lora_rank, cfg.q_lora_rank) == (32, 48)
    else:
        assert cfg.num_key_value_heads == 2


def test_make_tiny_rejects_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="llama"):
        make_tiny(tmp_path, "llama")


def test_model_package_needs_no_transformers(tmp_path):
    code = f"""
import sys
sys.modules["transformers"] = None  # any import of it now fails
from eaas.model import Checkpoint, DecoderModel, make_tiny
ckpt = Checkpoint.open(make_tiny({str(tmp_path / "t")!r}, "qwen2_moe", 0))
model = DecoderModel.load(ckpt)
print(len(model.generate_greedy(ckpt.tokenizer.encode("Hello"), 4)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


def test_tokenizer_round_trip_and_specials(tiny_dir):
    tok = Checkpoint.open(tiny_dir("mixtral")).tokenizer
    for text in (
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "héllo ✓ 😀 \n\t 42",
    ):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    eos = tok.eos_token_ids[0]
    assert tok.decode(tok.encode("hi") + [eos]) == "hi"
    assert tok.decode([eos], skip_special_tokens=False) == "<|endoftext|>"
    assert len(tok.encode("the quick brown fox")) < len(
        "the quick brown fox"
    )  # merges were learned


def test_text_stream_equals_decode_of_the_whole_sequence(tiny_dir):
    """Each token's new text, concatenated, is the decode of the whole sequence — also when a
    character spans tokens (its bytes split by byte-level BPE) and around special tokens."""
    import random

    tok = Checkpoint.open(tiny_dir("mixtral")).tokenizer
    eos = tok.eos_token_ids[0]
    texts = ["Hello, world!", "héllo ✓ 😀 \n\t 42", "the quick brown fox " * 20]
    for ids in [tok.encode(t) for t in texts] + [tok.encode("a 😀 b") + [eos] + tok.encode("c")]:
        stream = tok.stream()
        steps = [stream.step(t) for t in ids]
        assert "".join(steps) == tok.decode(ids)
    rng = random.Random(0)
    for _ in range(20):  # random ids: whenever the decode so far is whole, the stream agrees
        ids = [rng.randrange(tok.vocab_size) for _ in range(30)]
        stream, text = tok.stream(), ""
        for n, t in enumerate(ids, 1):
            text += stream.step(t)
            full = tok.decode(ids[:n])
            if "\ufffd" not in full:
                assert text == full


def test_default_chat_template(tiny_dir):
    tok = Checkpoint.open(tiny_dir("qwen3_moe")).tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert tok.token_to_id("<|user|>") is not None
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "x"}])


def test_jinja_chat_template_from_tokenizer_config(tiny_dir, tmp_path):
    src = tiny_dir("qwen3_moe")
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<|endoftext|>"})
    )
    tok = Tokenizer(tmp_path / "tokenizer.json")
    got = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert got == "[user]Hi<|endoftext|>[assistant]"


def test_config_field_names_of_each_hub_layout():
    base = {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 300,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "intermediate_size": 64,
    }
    q3 = ModelConfig.from_dict(
        {
            **base,
            "model_type": "qwen3_moe",
            "num_experts": 8,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
            "rope_parameters": {"rope_type": "default", "rope_theta": 5.0},
        }
    )
    assert [q3.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert q3.rope_theta == 5.0 and q3.rope_scaling is None and q3.num_key_value_heads == 4
    q2 = ModelConfig.from_dict(
        {**base, "model_type": "qwen2_moe", "num_experts": 8, "shared_expert_intermediate_size": 16}
    )
    assert q2.has_shared_expert and q2.shared_expert_gate and q2.qkv_bias
    ds = ModelConfig.from_dict(
        {
            **base,
            "model_type": "deepseek_v3",
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "intermediate_size": 64,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "first_k_dense_replace": 2,
            "rope_scaling": {"type": "yarn", "factor": 4.0},
        }
    )
    assert ds.shared_expert_intermediate_size == 64 and ds.head_dim == 12
    assert ds.rope_scaling["rope_type"] == "yarn"
    assert [ds.is_moe_layer(i) for i in range(4)] == [False, False, True, True]
    with pytest.raises(CheckpointError, match="'n_routed_experts'"):
        ModelConfig.from_dict(
            {**base, "model_type": "deepseek_v3", "kv_lora_rank": 16, "intermediate_size": 64}
        )


def test_encode_applies_the_tokenizers_own_post_processor(tiny_dir, tmp_path):
    """A tokenizer.json whose post-processor adds BOS (as Mixtral's does) gets it on encode."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    raw = HFTokenizer.from_file(str(tiny_dir("mixtral") / "tokenizer.json"))
    bos = raw.token_to_id("<|endoftext|>")
    raw.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    plain = Checkpoint.open(tiny_dir("mixtral")).tokenizer.encode("Hello")
    assert tok.encode("Hello") == [bos] + plain
    assert tok.encode("Hello", add_special_tokens=False) == plain


def test_config_is_frozen_and_hashable(tiny_dir):
    cfg = Checkpoint.open(tiny_dir("deepseek_v3")).config
    assert cfg.rope_scaling is not None
    assert hash(cfg) == hash(Checkpoint.open(tiny_dir("deepseek_v3")).config)
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]


# Field sets as the Hub's config.json files spell them (trimmed to what the model reads).
HUB_CONFIGS = {
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "intermediate_size": 6144,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 48,
        "tie_word_embeddings": False,
        "vocab_size": 151936,
        "eos_token_id": 151645,
        "bos_token_id": 151643,
        "attention_bias": False,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "intermediate_size": 5632,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 21,
        "vocab_size": 151936,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
    },
    "mistralai/Mixtral-8x7B-v0.1": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 14336,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "rms_norm_eps": 1e-05,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "deepseek-ai/DeepSeek-V3 (bf16)": {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048,
        "intermediate_size": 18432,
        "n_group": 8,
        "topk_group": 4,
        "first_k_dense_replace": 3,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_theta": 10000,
        "vocab_size": 129280,
        "max_position_embeddings": 163840,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 1,
    },
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_configs_parse(name):
    cfg = ModelConfig.from_dict(HUB_CONFIGS[name])
    moe = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    expect = {
        "Qwen/Qwen3-30B-A3B": (128, 8, 128, 48, False),
        "Qwen/Qwen1.5-MoE-A2.7B": (60, 4, 128, 24, True),
        "mistralai/Mixtral-8x7B-v0.1": (8, 2, 128, 32, False),
        "deepseek-ai/DeepSeek-V3 (bf16)": (256, 8, 192, 58, True),
    }[name]
    got = (cfg.num_experts, cfg.num_experts_per_tok, cfg.head_dim, sum(moe), cfg.has_shared_expert)
    assert got == expect
    assert all(cfg.sliding_window(i) is None for i in range(cfg.num_hidden_layers))
