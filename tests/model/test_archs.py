"""The architecture registry: every Arch builds a ModelConfig from its tiny config, its tensor
names are exactly those make_tiny and transformers write, and unknown model_types are refused."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

import eaas.model
from eaas.errors import CheckpointError
from eaas.model import ModelConfig, layout
from eaas.model.archs import ARCHS, get_arch
from eaas.model.tiny import QWEN3_30B_A3B, tiny_config


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118


def _layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape that layout says a per-expert checkpoint of `cfg` holds."""
    shapes = dict(layout.non_expert_shapes(cfg))
    f, h = cfg.moe_intermediate_size, cfg.hidden_size
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            for e in range(cfg.num_experts):
                names = layout.expert_names(cfg, layer, e)
                shapes.update({names["gate"]: (f, h), names["up"]: (f, h), names["down"]: (h, f)})
    return shapes


def test_registry_lists_the_names_eaas_model_exports_in_order():
    assert tuple(ARCHS) == eaas.model.ARCHS == ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3")
    assert type(eaas.model.ARCHS) is tuple
    assert all(arch.model_type == name for name, arch in ARCHS.items())
    with pytest.raises(TypeError):
        ARCHS["llama"] = ARCHS["mixtral"]  # type: ignore[index]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_config_builds_a_model_config_of_the_arch(arch):
    spec = ARCHS[arch]
    cfg = ModelConfig.from_dict(tiny_config(arch, 384, 0))
    assert cfg.model_type == arch and cfg.arch is spec
    assert cfg.scoring == spec.scoring
    assert cfg.is_mla == (spec.attention == "mla")
    assert not cfg.has_shared_expert or spec.shared_expert is not None
    assert not cfg.shared_expert_gate or spec.shared_expert_gate is not None


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_config_is_a_fresh_copy(arch):
    before = json.dumps(tiny_config(arch, 384, 0))
    for value in tiny_config(arch, 384, 0).values():  # a caller editing nested fields in place
        if isinstance(value, dict | list):
            value.clear()
    assert json.dumps(tiny_config(arch, 384, 0)) == before


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layout_names_every_tensor_make_tiny_writes(tiny_dir, arch):
    path = tiny_dir(arch)
    cfg = ModelConfig.from_file(path / "config.json")
    assert _header(path) == _layout(cfg)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layout_names_every_tensor_transformers_writes(tiny_dir, arch):
    pytest.importorskip("transformers")
    path = tiny_dir(arch, 0, "hf")  # XForCausalLM.save_pretrained: names nobody here wrote
    cfg = ModelConfig.from_file(path / "config.json")
    assert _header(path) == _layout(cfg)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_arch_tensor_names_are_the_ones_layout_uses(arch):
    spec = ARCHS[arch]
    cfg = ModelConfig.from_dict(tiny_config(arch, 384, 0))
    layer = cfg.num_hidden_layers - 1
    assert cfg.is_moe_layer(layer)
    prefix = f"model.layers.{layer}.{spec.moe_block}"
    assert layout.moe_prefix(cfg, layer) == prefix
    gate, up, down = spec.expert_proj
    assert layout.expert_names(cfg, layer, 3) == {
        "gate": f"{prefix}.experts.3.{gate}.weight",
        "up": f"{prefix}.experts.3.{up}.weight",
        "down": f"{prefix}.experts.3.{down}.weight",
    }
    names = layout.layer_shapes(cfg, layer)
    assert (f"{prefix}.gate.e_score_correction_bias" in names) == (spec.scoring == "sigmoid")
    assert (f"{prefix}.{spec.shared_expert}.up_proj.weight" in names) == cfg.has_shared_expert
    attn = {n.rsplit(".", 2)[-2] for n in layout.attention_shapes(cfg, layer)}
    assert ("kv_a_proj_with_mqa" in attn) == (spec.attention == "mla")
    assert ("k_proj" in attn) == (spec.attention == "gqa")


@pytest.mark.parametrize("model_type", ["llama", None, 3, ["qwen3_moe"]])
def test_unknown_model_type_is_refused_with_the_supported_ones(model_type):
    msg = re.escape(
        f"unknown model_type {model_type!r} "
        "(supported: qwen3_moe, qwen2_moe, mixtral, deepseek_v3)"
    )
    with pytest.raises(CheckpointError, match=f"^{msg}$"):
        get_arch(model_type)
    with pytest.raises(CheckpointError, match=f"^cfg\\.json: {msg}$"):
        ModelConfig.from_dict({"model_type": model_type}, source="cfg.json")


def test_presets_parse_and_qwen3_30b_is_importable_from_tiny():
    assert ARCHS["qwen3_moe"].presets["Qwen/Qwen3-30B-A3B"] is QWEN3_30B_A3B
    for name, spec in ARCHS.items():
        for preset in spec.presets.values():
            cfg = ModelConfig.from_dict({**tiny_config(name, 384, 0), **preset})
            assert (cfg.hidden_size, cfg.num_hidden_layers) == (
                preset["hidden_size"],
                preset["num_hidden_layers"],
            )


@pytest.mark.parametrize(
    ("change", "field"),
    [({"attention": "mha"}, "attention"), ({"scoring": "relu"}, "scoring"),
     ({"expert_proj": ("w1", "", "w2")}, "expert_proj")],
)
def test_arch_rejects_unknown_kinds(change, field):
    with pytest.raises(ValueError, match=rf"Arch 'mixtral': {field} "):
        replace(get_arch("mixtral"), **change)
