"""make_random writes checkpoints that eaas and transformers both load and agree on, at tiny and
at Qwen3-30B-A3B width, sharded or not, and stay finite in bfloat16."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from eaas.errors import ConfigError
from eaas.model import Checkpoint, DecoderModel
from eaas.model.tiny import QWEN3_30B_A3B, make_random

SMALL = dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_experts=16, num_experts_per_tok=4, moe_intermediate_size=48,
             intermediate_size=64, num_hidden_layers=2, mlp_only_layers=[])
# the real width (H, heads, F), few layers and experts: the scaling must hold at H = 2048
WIDE = {**QWEN3_30B_A3B, "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _hf_logits(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # [L, V]


def test_sharded_small_override_matches_transformers(tmp_path):
    path = make_random(tmp_path / "s", "qwen3_moe", seed=3, dtype="float32", max_shard_bytes=1,
                       **SMALL)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + SMALL["num_hidden_layers"]
    ckpt = Checkpoint.open(path)
    assert (ckpt.config.hidden_size, ckpt.config.num_experts) == (96, 16)
    ids = list(range(5, 17))
    model = DecoderModel.load(ckpt)
    ours = model.forward(torch.tensor(ids), model.new_cache())  # [L, V]
    ref = _hf_logits(path, ids)
    assert _rel(ours, ref) < 1e-4, "eaas and transformers logits differ"
    assert ours[-1].argmax() == ref[-1].argmax()


def test_sharding_does_not_change_the_weights(tmp_path):
    one = make_random(tmp_path / "one", "qwen3_moe", seed=1, dtype="float32", **SMALL)
    many = make_random(tmp_path / "many", "qwen3_moe", seed=1, dtype="float32",
                       max_shard_bytes=1, **SMALL)
    assert (one / "model.safetensors").exists() and not (one / "model.safetensors.index.json"
                                                           ).exists()
    merged: dict[str, torch.Tensor] = {}
    for f in sorted(many.glob("model-*.safetensors")):
        merged.update(load_file(f))
    single = load_file(one / "model.safetensors")
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)


@pytest.mark.slow
def test_qwen3_width_bf16_is_finite_and_matches_transformers(tmp_path):
    path = make_random(tmp_path / "w", "qwen3_moe", seed=0, dtype="bfloat16", **WIDE)
    ckpt = Checkpoint.open(path)
    assert ckpt.config.hidden_size == 2048 and ckpt.config.moe_intermediate_size == 768
    ids = list(range(20, 36))
    low = DecoderModel.load(ckpt, torch.bfloat16)
    bf16 = low.forward(torch.tensor(ids), low.new_cache())  # float32 logits of a bf16 forward
    assert torch.isfinite(bf16).all()
    assert 1e-2 < float(bf16.std()) < 1e3, "logits collapsed or exploded in bf16"
    full = DecoderModel.load(ckpt, torch.float32)
    ours = full.forward(torch.tensor(ids), full.new_cache())
    assert _rel(ours, _hf_logits(path, ids)) < 1e-3
    assert _rel(bf16, ours) < 0.1, "bf16 drifts far from float32 on the same weights"


def test_bad_arch_and_dtype_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="arch"):
        make_random(tmp_path / "x", "llama")
    with pytest.raises(ConfigError, match="dtype"):
        make_random(tmp_path / "x", "qwen3_moe", dtype="int8")
