"""Checkpoint.open(path, load_format="dummy"): a folder with config.json and tokenizer files but
no safetensors gives every tensor the config implies, seeded, the same bits on every read and
in every process, distinct per tensor and per seed, finite through the reference model; the
default load_format still refuses such a folder with its clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from eaas.errors import CheckpointError
from eaas.model import ARCHS, Checkpoint, DecoderModel, make_tiny
from eaas.model.checkpoint import _dummy_key, _mix32, dummy_values
from eaas.model.layout import expert_names, non_expert_shapes


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """config_only(arch) -> a make_tiny folder with its safetensors removed."""
    made = {}

    def get(arch: str):
        if arch not in made:
            out = make_tiny(tmp_path_factory.mktemp(f"dummy-{arch}"), arch)
            for f in out.glob("*.safetensors*"):
                f.unlink()
            made[arch] = out
        return made[arch]

    return get


def test_auto_still_refuses_a_config_only_folder(config_only):
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        Checkpoint.open(config_only("qwen3_moe"))


def test_unknown_load_format_is_a_value_error(config_only):
    with pytest.raises(ValueError, match="load_format 'pt' is not one of"):
        Checkpoint.open(config_only("qwen3_moe"), load_format="pt")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_has_the_config_shape_and_dtype(config_only, arch):
    ckpt = Checkpoint.open(config_only(arch), load_format="dummy")
    cfg = ckpt.config
    assert ckpt.load_format == "dummy" and ckpt.tokenizer is not None
    for name, shape in non_expert_shapes(cfg).items():
        t = ckpt.read(name)
        assert t.shape == shape and t.dtype == torch.float32, name  # config: float32
        assert torch.isfinite(t).all() and t.unique().numel() > 1, name
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    f, h = cfg.moe_intermediate_size, cfg.hidden_size
    ex = ckpt.read_expert(moe[-1], cfg.num_experts - 1, torch.bfloat16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in ex.items()} == {
        "gate": ((f, h), torch.bfloat16), "up": ((f, h), torch.bfloat16),
        "down": ((h, f), torch.bfloat16)}
    assert ckpt.has(expert_names(cfg, moe[0], 0)["gate"]) and not ckpt.has("nope.weight")
    with pytest.raises(CheckpointError, match="missing tensor 'nope.weight'"):
        ckpt.read("nope.weight")


def test_same_bits_twice_different_tensors_differ(config_only):
    path = config_only("qwen3_moe")
    a, b = Checkpoint.open(path, "dummy"), Checkpoint.open(path, "dummy")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.read(name), b.read(name))
    e1, e2 = a.read_expert(0, 3), b.read_expert(0, 3)
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    assert not torch.equal(e1["gate"], e1["up"])
    assert not torch.equal(e1["gate"], a.read_expert(0, 4)["gate"])
    assert not torch.equal(a.read(name), Checkpoint.open(path, "dummy", seed=1).read(name))
    # a dtype is a cast of the same float32 values
    assert torch.equal(a.read(name, torch.bfloat16), a.read(name).to(torch.bfloat16))
    assert a.stats["tensors_read"] == 10  # 5 single reads, 2 experts x 3


def test_scales_follow_random_init(config_only):
    ckpt = Checkpoint.open(config_only("qwen3_moe"), "dummy")
    h = ckpt.config.hidden_size
    norm = ckpt.read("model.layers.0.input_layernorm.weight")
    assert abs(norm.mean() - 1) < 0.05 and abs(norm.std() - 0.1) < 0.03
    router = ckpt.read("model.layers.0.mlp.gate.weight")  # [E, H]: gain 2.4 / sqrt(H)
    assert router.std().item() == pytest.approx(2.4 / h**0.5, rel=0.1)
    big = dummy_values(_dummy_key(0, "x"), (1 << 20,), 0.0, 1.0, torch.float32, "cpu")
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01 and big.abs().max() < 3.5


def test_values_match_an_independent_python_hash():
    """The int64 torch ops compute the documented hash (and hence do not depend on a device)."""
    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    k0, k1, k2 = key = _dummy_key(3, "w")
    got = dummy_values(key, (5000,), 0.0, 2.0, torch.float32, "cpu")
    for i in (0, 1, 4999):
        h1 = mix(mix((i + k0) & 0xFFFFFFFF) ^ k1)
        h2 = mix(h1 ^ k2)
        s = (h1 & 0xFFFF) + (h1 >> 16) + (h2 & 0xFFFF) + (h2 >> 16) - 131070
        want = torch.tensor(s, dtype=torch.float32) * (2.0 / 37837.22776)
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=0)
    x = torch.tensor([0, 1, 0xFFFFFFFF])
    assert _mix32(x.clone()).tolist() == [mix(int(v)) for v in x]


def test_another_process_reads_the_same_bits(config_only):
    path = config_only("qwen3_moe")
    code = ("import sys, torch; from eaas.model import Checkpoint; "
            f"t = Checkpoint.open({str(path)!r}, 'dummy').read_expert(2, 5)['down']; "
            "sys.stdout.write(t.numpy().tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    here = Checkpoint.open(path, "dummy").read_expert(2, 5)["down"]
    assert bytes.fromhex(out) == here.numpy().tobytes()


def test_dummy_model_runs_finite(config_only):
    model = DecoderModel.load(Checkpoint.open(config_only("qwen3_moe"), "dummy"))
    out = model.generate_greedy([5, 17, 42, 7], max_new_tokens=4)
    assert len(out) == 4 and all(0 <= t < model.config.vocab_size for t in out)
