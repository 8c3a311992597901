"""Block configs: the shipped JSON parses, lookup takes the nearest T, else the heuristic."""

from __future__ import annotations

import json

import pytest

from eaas_kernels.configs import CONFIG_DIR, GemmConfig, MoEConfig, default_config, lookup_config


def test_every_shipped_config_is_valid():
    files = sorted(CONFIG_DIR.glob("*.json"))
    assert files, "no tuned configs shipped"
    for path in files:
        for key, table in json.loads(path.read_text()).items():
            assert key.startswith("E=") and ",dtype=" in key
            for tokens, entry in table.items():
                assert int(tokens) >= 1
                assert MoEConfig.from_dict(entry).to_dict() == entry


def test_lookup_takes_the_nearest_tuned_token_count():
    table = json.loads((CONFIG_DIR / "NVIDIA_H200.json").read_text())
    shape = table["E=128,H=2048,F=768,dtype=bfloat16"]
    got = lookup_config("NVIDIA H200", 128, 2048, 768, "bfloat16", num_tokens=3000, top_k=8)
    assert got == MoEConfig.from_dict(shape["4096"])
    got = lookup_config("NVIDIA H200", 128, 2048, 768, "bfloat16", num_tokens=100, top_k=8)
    assert got == MoEConfig.from_dict(shape["128"])


def test_unknown_card_or_shape_falls_back_to_the_heuristic():
    want = default_config(4 * 8, 128)
    assert lookup_config("no such card", 128, 2048, 768, "bfloat16", 4, 8) == want
    assert lookup_config("NVIDIA H200", 7, 64, 32, "float32", 4, 8) == default_config(32, 7)
    assert default_config(32, 128).block_m == 16
    assert default_config(4096 * 8, 128).block_m == 128


def test_bad_tiles_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        GemmConfig(block_n=48)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        MoEConfig(block_m=8)
