"""Every kind of bad checkpoint gives one CheckpointError naming the file and the field or
tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eaas.errors import CheckpointError
from eaas.model import Checkpoint, DecoderModel


@pytest.fixture
def ckpt_dir(tiny_dir, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir("qwen3_moe"), dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_directory_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="nope.*does not exist"):
        Checkpoint.open(tmp_path / "nope")


def test_config_json_missing(ckpt_dir):
    (ckpt_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint.open(ckpt_dir)


def test_config_json_not_json(ckpt_dir):
    (ckpt_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint.open(ckpt_dir)


def test_unknown_model_type(ckpt_dir):
    _edit_config(ckpt_dir, model_type="llama")
    with pytest.raises(CheckpointError, match="config.json.*model_type 'llama'"):
        Checkpoint.open(ckpt_dir)


def test_missing_config_field(ckpt_dir):
    _edit_config(ckpt_dir, hidden_size=None)
    with pytest.raises(CheckpointError, match="config.json.*'hidden_size'"):
        Checkpoint.open(ckpt_dir)


def test_bad_config_value(ckpt_dir):
    _edit_config(ckpt_dir, num_experts_per_tok=0)
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        Checkpoint.open(ckpt_dir)


def test_missing_tensor(ckpt_dir):
    _edit_tensors(ckpt_dir, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor 'model.layers.0.self_attn.k_proj.weight'.*model.safetensors",
    ):
        Checkpoint.open(ckpt_dir)


def test_missing_expert_tensor(ckpt_dir):
    _edit_tensors(ckpt_dir, lambda t: t.pop("model.layers.2.mlp.experts.7.up_proj.weight"))
    with pytest.raises(CheckpointError, match="'model.layers.2.mlp.experts.7.up_proj.weight'"):
        Checkpoint.open(ckpt_dir)


def test_wrong_shape(ckpt_dir):
    def edit(t):
        t["model.norm.weight"] = torch.ones(65)

    _edit_tensors(ckpt_dir, edit)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors.*'model.norm.weight'.*\[65\].*\[64\]"
    ):
        Checkpoint.open(ckpt_dir)


def test_unreadable_safetensors(ckpt_dir):
    (ckpt_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage-not-a-header")
    with pytest.raises(CheckpointError, match="model.safetensors.*unreadable"):
        Checkpoint.open(ckpt_dir)


def test_no_weights_file(ckpt_dir):
    (ckpt_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint.open(ckpt_dir)


def test_index_points_to_missing_shard(ckpt_dir):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (ckpt_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index.json.*model-00002-of-00002.safetensors"):
        Checkpoint.open(ckpt_dir)


def test_file_truncated_after_open(ckpt_dir):
    ckpt = Checkpoint.open(ckpt_dir)
    data = (ckpt_dir / "model.safetensors").read_bytes()
    (ckpt_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DecoderModel.load(ckpt)


def test_missing_tokenizer(ckpt_dir):
    (ckpt_dir / "tokenizer.json").unlink()
    ckpt = Checkpoint.open(ckpt_dir)  # weights alone are usable
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        _ = ckpt.tokenizer


def test_unsupported_rope_scaling(ckpt_dir):
    _edit_config(ckpt_dir, rope_scaling={"type": "longrope", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope_scaling.*longrope"):
        Checkpoint.open(ckpt_dir)


def test_read_unknown_tensor(ckpt_dir):
    with pytest.raises(CheckpointError, match="missing tensor 'model.nothing'"):
        Checkpoint.open(ckpt_dir).read("model.nothing")


def test_quantized_checkpoint_is_refused(ckpt_dir):
    _edit_config(ckpt_dir, quantization_config={"quant_method": "fp8", "fmt": "e4m3"})
    with pytest.raises(CheckpointError, match="config.json.*quantization_config.*fp8"):
        Checkpoint.open(ckpt_dir)


def test_config_field_of_wrong_type(ckpt_dir):
    _edit_config(ckpt_dir, hidden_size="big")
    with pytest.raises(CheckpointError, match="config.json: field 'hidden_size' must be int"):
        Checkpoint.open(ckpt_dir)


def test_dense_layers_need_intermediate_size(ckpt_dir):
    _edit_config(ckpt_dir, intermediate_size=None)  # the tiny qwen3_moe has mlp_only_layers=[1]
    with pytest.raises(CheckpointError, match=r"'intermediate_size'.*\[1\]"):
        Checkpoint.open(ckpt_dir)
