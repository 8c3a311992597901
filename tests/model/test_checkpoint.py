"""Checkpoint: lazy, sliceable reads (per-expert, fused, sharded) and dtype selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from eaas.model import Checkpoint, ExpertBank, DecoderModel
from eaas.model.layout import expert_names


@pytest.fixture
def read_spy(monkeypatch):
    """Record the name of every tensor (or slice) the real safetensors reader hands out."""
    seen: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._fh = real_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            seen.append(name)
            return self._inner.get_tensor(name)

        def get_slice(self, name):
            inner = self._inner.get_slice(name)

            class Slice:
                def get_shape(self):
                    return inner.get_shape()

                def __getitem__(self, idx):
                    seen.append(f"{name}[{idx}]")
                    return inner[idx]

            return Slice()

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    return seen


def _fuse_experts(src: Path, dst: Path) -> Path:
    """Rewrite a per-expert checkpoint with each layer's experts fused into 3-D tensors."""
    ckpt = Checkpoint.open(src)
    cfg = ckpt.config
    tensors = load_file(src / "model.safetensors")
    for layer in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(layer):
            continue
        names = [expert_names(cfg, layer, e) for e in range(cfg.num_experts)]
        gate_up = torch.stack([torch.cat([tensors[n["gate"]], tensors[n["up"]]]) for n in names])
        down = torch.stack([tensors[n["down"]] for n in names])
        for n in names:
            for v in n.values():
                del tensors[v]
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up  # [E, 2F, H]
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = down  # [E, H, F]
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def _shard(src: Path, dst: Path, num_shards: int = 3) -> Path:
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    dst.mkdir()
    weight_map = {}
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::num_shards]}
        save_file(part, dst / fname)
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_expert_bank_reads_only_requested_experts(tiny_dir, read_spy):
    ckpt = Checkpoint.open(tiny_dir("qwen3_moe"))
    read_spy.clear()
    cfg = ckpt.config
    bank = ExpertBank.load(ckpt, 2, {3, 7}, torch.float32)
    expected = sorted(n for e in (3, 7) for n in expert_names(cfg, 2, e).values())
    assert sorted(read_spy) == expected
    f, h = cfg.moe_intermediate_size, cfg.hidden_size
    assert ckpt.stats == {"tensors_read": 6, "bytes_read": 6 * f * h * 4}
    assert bank.expert_ids == (3, 7)


def test_fused_experts_are_read_by_slice(tiny_dir, tmp_path, read_spy):
    fused = Checkpoint.open(_fuse_experts(tiny_dir("deepseek_v3"), tmp_path / "fused"))
    read_spy.clear()
    w = fused.read_expert(2, 5, torch.float32)
    assert read_spy == [
        "model.layers.2.mlp.experts.gate_up_proj[5]",
        "model.layers.2.mlp.experts.down_proj[5]",
    ]
    f, h = fused.config.moe_intermediate_size, fused.config.hidden_size
    assert (
        fused.stats["bytes_read"] == 3 * f * h * 4
    )  # one expert's slices, not the [E, ...] tensors
    plain = Checkpoint.open(tiny_dir("deepseek_v3")).read_expert(2, 5, torch.float32)
    for key in ("gate", "up", "down"):
        assert torch.equal(w[key], plain[key]), key


def test_fused_and_sharded_checkpoints_give_identical_logits(tiny_dir, tmp_path):
    src = tiny_dir("qwen2_moe")
    ids = torch.arange(3, 15)
    want = DecoderModel.load(Checkpoint.open(src)).forward(
        ids, DecoderModel.load(Checkpoint.open(src)).new_cache()
    )
    for variant in (_fuse_experts(src, tmp_path / "fused"), _shard(src, tmp_path / "sharded")):
        model = DecoderModel.load(Checkpoint.open(variant))
        assert torch.equal(model.forward(ids, model.new_cache()), want), variant.name


def test_sharded_checkpoint_reads_from_the_right_shard(tiny_dir, tmp_path):
    ckpt = Checkpoint.open(_shard(tiny_dir("mixtral"), tmp_path / "sharded"))
    name = "model.layers.1.block_sparse_moe.experts.4.w2.weight"
    assert torch.equal(ckpt.read(name), load_file(tiny_dir("mixtral") / "model.safetensors")[name])
    assert ckpt.stats["tensors_read"] == 1


def test_attention_shard_skips_routed_experts(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("mixtral"))
    model = DecoderModel.load(ckpt, load_experts=False)
    cfg = ckpt.config
    assert all(layer.experts is None for layer in model.layers)
    expert_bytes = 0
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            expert_bytes += 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    file_bytes = (ckpt.path / "model.safetensors").stat().st_size
    assert ckpt.stats["bytes_read"] < file_bytes - expert_bytes + 4096
    with pytest.raises(ValueError, match="load_experts=False"):
        model.forward(torch.tensor([1, 2]), model.new_cache())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_selectable(tiny_dir, dtype):
    model = DecoderModel.load(Checkpoint.open(tiny_dir("deepseek_v3")), dtype=dtype)
    assert model.layers[1].experts.gate.dtype == dtype
    assert model.embed_weight.dtype == dtype
    logits = model.forward(torch.tensor([5, 6, 7]), model.new_cache())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref = DecoderModel.load(Checkpoint.open(tiny_dir("deepseek_v3")))
    want = ref.forward(torch.tensor([5, 6, 7]), ref.new_cache())
    tol = {torch.float32: 1e-6, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    assert float((logits - want).abs().max() / want.abs().max()) < tol


def test_eos_and_tokenizer_come_from_the_checkpoint(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("qwen3_moe"))
    eos = ckpt.tokenizer.token_to_id("<|endoftext|>")
    assert ckpt.eos_token_ids == (eos,)
    assert ckpt.tokenizer.eos_token_ids == (eos,)
