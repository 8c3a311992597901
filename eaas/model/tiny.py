"""make_tiny / make_random: random-weight checkpoints of a supported architecture, in the
Hugging Face format.

Writes config.json (Hub-style field names), model.safetensors (per-expert tensor names, as Hub
checkpoints have them), a byte-level BPE tokenizer.json trained offline on a small built-in text,
and generation_config.json. Needs neither transformers nor the network. `make_tiny` has one fixed
tiny shape per architecture (the tests' checkpoints); `make_random` takes any shape (presets such
as `QWEN3_30B_A3B` for the GPU benchmarks; each architecture's tiny shape and presets live in its
module under eaas.model.archs) and writes large models layer by layer, sharded.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from eaas.errors import ConfigError
from eaas.model import layout
from eaas.model.archs import get_arch
from eaas.model.archs.qwen3_moe import QWEN3_30B_A3B
from eaas.model.config import ARCHS, ModelConfig

__all__ = ["QWEN3_30B_A3B", "make_config_only", "make_random", "make_tiny", "tiny_config",
           "train_tokenizer"]

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
    """The config.json dict of a tiny `arch` model (Hub field names): the fields below, shared by
    every architecture, overridden by the architecture's own (`Arch.tiny` in eaas.model.archs)."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {ARCHS}")
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
    return {**common, **copy.deepcopy(dict(get_arch(arch).tiny))}


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
    """Write a tiny random `arch` checkpoint into `out_dir` (created if needed); returns it."""
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
    _write_side_files(out, raw, tok, eos)
    return out


def _write_side_files(out: Path, raw: dict[str, Any], tok: Any, eos: int) -> None:
    """config.json, tokenizer.json, tokenizer_config.json, generation_config.json."""
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


# ---- make_random: any shape, for benchmarks ------------------------------------------------

def _random_init(name: str, shape: tuple[int, ...], gen: torch.Generator, device: str,
                 out_proj: tuple[str, ...]) -> torch.Tensor:
    """Fan-in scaled N(0, gain^2 / fan_in) so every projection keeps ~unit rms at any width
    (finite in bf16 at H = 2048, 48 layers); output projections get gain 0.5 so the residual
    stream grows slowly; routers gain 2.4 (well separated expert choices, as make_tiny's).
    `out_proj`: name suffixes of the output projections."""
    def randn(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).mul_(std)

    if name.endswith("norm.weight"):
        return 1.0 + randn(0.1)
    if name == "model.embed_tokens.weight":
        return randn(1.0)
    if name.endswith((".bias", "e_score_correction_bias")):
        return randn(0.05)
    fan_in = shape[-1]
    if name.endswith("gate.weight"):
        gain = 2.4
    elif name.endswith(out_proj):
        gain = 0.5
    else:
        gain = 1.0
    return randn(gain / fan_in ** 0.5)


def _layer_specs(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of decoder layer `layer`, routed experts included."""
    specs = dict(layout.layer_shapes(cfg, layer))
    if cfg.is_moe_layer(layer):
        f, h = cfg.moe_intermediate_size, cfg.hidden_size
        for e in range(cfg.num_experts):
            for key, name in layout.expert_names(cfg, layer, e).items():
                specs[name] = (h, f) if key == "down" else (f, h)
    return specs


def _start(out_dir: str | Path, arch: str, dtype: str, overrides: dict[str, Any], who: str
           ) -> tuple[Path, dict[str, Any], Any, int, ModelConfig]:
    """Check arch/dtype, create out_dir; (out, raw config.json, tokenizer, eos id, config)."""
    if arch not in ARCHS:
        raise ConfigError(f"{who}: arch {arch!r} is not one of {', '.join(ARCHS)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{who}: dtype {dtype!r} is not float32, bfloat16 or float16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    raw = {**tiny_config(arch, tok.get_vocab_size(with_added_tokens=True), eos),
           **overrides, "torch_dtype": dtype}
    return out, raw, tok, eos, ModelConfig.from_dict(raw)


def make_config_only(out_dir: str | Path, arch: str, *, dtype: str = "bfloat16",
                     **config_overrides: Any) -> Path:
    """Write only config.json and the tokenizer of an `arch` model of any shape (fields as
    `make_random` takes them): a folder to open with `load_format="dummy"`, whose weights are
    made in memory (a full-size shape without writing it to disk)."""
    out, raw, tok, eos, _ = _start(out_dir, arch, dtype, config_overrides, "make_config_only")
    _write_side_files(out, raw, tok, eos)
    return out


def make_random(out_dir: str | Path, arch: str, *, seed: int = 0, dtype: str = "bfloat16",
                init_device: str = "cpu", max_shard_bytes: int = 2 << 30,
                **config_overrides: Any) -> Path:
    """Write a random `arch` checkpoint of any shape into `out_dir`; returns its path.

    The same writer as `make_tiny` (tokenizer, Hub config names, per-expert tensor names), with
    any config.json field overridden (`make_random(d, "qwen3_moe", **QWEN3_30B_A3B,
    num_hidden_layers=8)`). Weights are fan-in scaled (see `_random_init`), generated on
    `init_device` ("cuda" is much faster at full size) and stored as `dtype`. Tensors are made
    and written one decoder layer at a time, so host memory peaks at about one layer: above
    `max_shard_bytes` in total, one safetensors shard per layer (plus one for embeddings, final
    norm and lm_head) and `model.safetensors.index.json`; else one `model.safetensors`.
    The output depends on (arch, seed, dtype, overrides, init_device), not on the sharding.
    """
    from safetensors.torch import save_file

    out, raw, tok, eos, cfg = _start(out_dir, arch, dtype, config_overrides, "make_random")
    tdtype = getattr(torch, dtype)
    out_proj = ("o_proj.weight", "down_proj.weight", f".{cfg.arch.expert_proj[2]}.weight")
    top = {n: s for n, s in layout.non_expert_shapes(cfg).items()
           if not n.startswith("model.layers.")}  # embeddings, final norm, lm_head
    groups = [top] + [_layer_specs(cfg, layer) for layer in range(cfg.num_hidden_layers)]
    itemsize = torch.empty((), dtype=tdtype).element_size()
    total = sum(itemsize * math.prod(s) for g in groups for s in g.values())
    sharded = total > max_shard_bytes
    weight_map: dict[str, str] = {}
    single: dict[str, torch.Tensor] = {}
    for i, specs in enumerate(groups):  # group 0: embeddings/norm/lm_head; i >= 1: layer i - 1
        gen = torch.Generator(device=init_device).manual_seed(seed * 1_000_003 + i)
        tensors: dict[str, torch.Tensor] = {}
        for n, s in sorted(specs.items()):  # cast at once: host memory ~ one layer in `dtype`
            t = _random_init(n, s, gen, init_device, out_proj)
            tensors[n] = t if i == 0 else t.to(tdtype).cpu().contiguous()
        if i == 0:
            if "lm_head.weight" in tensors:  # as make_tiny: no greedy lock on one token
                emb = tensors["model.embed_tokens.weight"]
                unit = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
                tensors["lm_head.weight"] -= 1.25 * unit / cfg.hidden_size ** 0.5
            tensors = {n: t.to(tdtype).cpu().contiguous() for n, t in tensors.items()}
        if not sharded:
            single.update(tensors)
            continue
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        save_file(single, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_side_files(out, raw, tok, eos)
    return out
