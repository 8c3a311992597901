"""Checkpoint: a Hugging Face checkpoint directory, read lazily tensor by tensor.

Nothing is read at `open` except config.json, the index and the safetensors headers (to check that
every tensor the architecture needs is there with the right shape). `read` and `read_expert` then
read exactly the tensors asked for; a server hosting experts {3, 7} of layer 5 reads six tensors
(or two slices of each fused tensor), never a whole file. `stats` counts what was read.

`Checkpoint.open(path, load_format="dummy")` (vLLM's dummy format) needs only config.json (and
the tokenizer files): every tensor is made on read, see `_DummyCheckpoint`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import NoReturn

import torch

from eaas.errors import CheckpointError
from eaas.model import layout
from eaas.model.config import ModelConfig
from eaas.model.tokenizer import Tokenizer

__all__ = ["LOAD_FORMATS", "Checkpoint"]

LOAD_FORMATS = ("auto", "dummy")

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class Checkpoint:
    """An opened checkpoint directory. Use `Checkpoint.open(path)`."""

    load_format = "auto"

    def __init__(
        self,
        path: Path,
        config: ModelConfig,
        weight_map: dict[str, str],
        shapes: dict[str, tuple[int, ...]],
        eos_token_ids: tuple[int, ...],
        bos_token_id: int | None,
    ) -> None:
        self.path = path
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self._weight_map = weight_map  # tensor name -> file name
        self._shapes = shapes  # tensor name -> shape (from headers)
        self._tokenizer: Tokenizer | None = None
        self._stats = {"tensors_read": 0, "bytes_read": 0}

    # --- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, load_format: str = "auto", *, seed: int = 0) -> Checkpoint:
        """Open and validate `path`; raise CheckpointError naming the file and field/tensor.

        load_format "auto": the safetensors files (model.safetensors or an index + shards).
        "dummy": config.json only (safetensors, if any, are ignored); each tensor is seeded
        random values made on `read`/`read_expert`, the same bits for the same (`seed`, name).
        """
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {load_format!r} is not one of {LOAD_FORMATS}")
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory does not exist")
        config = ModelConfig.from_file(path / "config.json")
        if load_format == "dummy":
            return _DummyCheckpoint(path, config, *_eos_bos(path, config), seed=seed)
        weight_map = _read_weight_map(path)
        shapes: dict[str, tuple[int, ...]] = {}
        for fname in sorted(set(weight_map.values())):
            for name, shape in _read_header(path / fname).items():
                shapes[name] = shape
        for name, fname in weight_map.items():
            if name not in shapes:
                raise CheckpointError(
                    f"{path / fname}: tensor {name!r} listed in {_INDEX} is missing"
                )
        ckpt = cls(path, config, weight_map, shapes, *_eos_bos(path, config))
        ckpt._validate()
        return ckpt

    def _validate(self) -> None:
        cfg = self.config
        for name, shape in layout.non_expert_shapes(cfg).items():
            self._check(name, shape)
        for layer in range(cfg.num_hidden_layers):
            if cfg.is_moe_layer(layer):
                self._expert_source(layer, 0)
                self._expert_source(layer, cfg.num_experts - 1)

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        got = self._shapes.get(name)
        if got is None:
            self._missing(name)
        if tuple(got) != tuple(shape):
            raise CheckpointError(
                f"{self.path / self._weight_map[name]}: tensor {name!r} has shape {list(got)}, "
                f"expected {list(shape)}"
            )

    # --- public API ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            tpath = self.path / "tokenizer.json"
            if not tpath.exists():
                raise CheckpointError(f"{tpath}: tokenizer.json not found")
            self._tokenizer = Tokenizer(tpath, self.eos_token_ids, self.bos_token_id)
        return self._tokenizer

    @property
    def stats(self) -> dict[str, int]:
        """{"tensors_read", "bytes_read"} since open (slices count as one tensor each)."""
        return dict(self._stats)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            self._missing(name)
        return self._shapes[name]

    def read(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Read one tensor (only it) and cast to `dtype` (None keeps the stored dtype)."""
        if name not in self._weight_map:
            self._missing(name)
        tensor = self._load(name, None, dtype, device)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def read_expert(
        self,
        layer: int,
        expert: int,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Routed expert `expert` of `layer`: {"gate": [F, H], "up": [F, H], "down": [H, F]}.

        Reads the three per-expert tensors, or the expert's slices of fused 3-D tensors.
        """
        cfg = self.config
        if not 0 <= layer < cfg.num_hidden_layers or not cfg.is_moe_layer(layer):
            raise ValueError(f"layer {layer} has no routed experts")
        if not 0 <= expert < cfg.num_experts:
            raise ValueError(f"expert {expert} outside 0..{cfg.num_experts - 1}")
        source = self._expert_source(layer, expert)
        f = cfg.moe_intermediate_size
        if isinstance(source, dict):
            out = {k: self._load(n, None, dtype, device) for k, n in source.items()}
        else:
            gate_up = self._load(source[0], expert)  # [2F, H]
            out = {"gate": gate_up[:f], "up": gate_up[f:], "down": self._load(source[1], expert)}
        return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in out.items()}

    # --- internals -----------------------------------------------------------------------
    def _missing(self, name: str) -> NoReturn:
        files = ", ".join(sorted(set(self._weight_map.values()))) or "no weight files"
        raise CheckpointError(f"{self.path}: missing tensor {name!r} (not in {files})")

    def _expert_source(self, layer: int, expert: int) -> dict[str, str] | tuple[str, str]:
        cfg = self.config
        h, f = cfg.hidden_size, cfg.moe_intermediate_size
        names = layout.expert_names(cfg, layer, expert)
        fused = None if names["gate"] in self._shapes else self._fused(layer)
        if fused is None:
            expect = {"gate": (f, h), "up": (f, h), "down": (h, f)}
            for key, name in names.items():
                self._check(name, expect[key])
            return names
        gate_up, down = fused
        self._check(gate_up, (cfg.num_experts, 2 * f, h))
        self._check(down, (cfg.num_experts, h, f))
        return gate_up, down

    def _fused(self, layer: int) -> tuple[str, str] | None:
        gate_ups, downs = layout.fused_expert_names(self.config, layer)
        for gu, dn in zip(gate_ups, downs):
            if gu in self._shapes and dn in self._shapes:
                return gu, dn
        return None

    def _load(self, name: str, index: int | None, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> torch.Tensor:
        """Read tensor `name` (or its `index`-th slice along dim 0) from its file, on the CPU
        in its stored dtype (the caller casts; `dtype`/`device` serve `_DummyCheckpoint`)."""
        from safetensors import SafetensorError, safe_open

        fpath = self.path / self._weight_map[name]
        try:
            with safe_open(str(fpath), framework="pt") as fh:
                tensor = fh.get_tensor(name) if index is None else fh.get_slice(name)[index]
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{fpath}: cannot read tensor {name!r} ({exc})") from None
        self._stats["tensors_read"] += 1
        self._stats["bytes_read"] += tensor.numel() * tensor.element_size()
        return tensor


def _eos_bos(path: Path, config: ModelConfig) -> tuple[tuple[int, ...], int | None]:
    """(eos ids, bos id): config.json's, overridden by generation_config.json's if present."""
    eos, bos = config.eos_token_ids, config.bos_token_id
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        try:
            gen = json.loads(gen_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{gen_path}: cannot read ({exc})") from None
        g_eos = gen.get("eos_token_id")
        if g_eos is not None:
            eos = tuple(int(i) for i in (g_eos if isinstance(g_eos, list) else [g_eos]))
        bos = gen.get("bos_token_id", bos)
    return eos, bos


def _read_weight_map(path: Path) -> dict[str, str]:
    index = path / _INDEX
    if index.exists():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: cannot read weight_map ({exc!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must be an object")
        for name, fname in weight_map.items():
            if not (path / fname).exists():
                raise CheckpointError(f"{index}: tensor {name!r} points to missing file {fname!r}")
        return dict(weight_map)
    single = path / _SINGLE
    if not single.exists():
        raise CheckpointError(f"{path}: neither {_SINGLE} nor {_INDEX} found")
    return {name: _SINGLE for name in _read_header(single)}


def _read_header(fpath: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape from a safetensors header (reads no tensor data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(fpath), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{fpath}: unreadable safetensors file ({exc})") from None


# ---- load_format="dummy" --------------------------------------------------------------------

_DUMMY_FILE = "<dummy>"
_DUMMY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22  # elements per generation pass (bounds the int64 temporaries: ~32 MB each)
# Irwin-Hall: a sum of 4 uniform 16-bit integers has mean 2 * 65535 and this standard deviation
_IH_MEAN, _IH_STD = 2 * 65535, math.sqrt(4 * (65536**2 - 1) / 12)


class _DummyCheckpoint(Checkpoint):
    """A config-only checkpoint: every tensor of `layout` (per-expert names, Hub layout) exists
    with the shape the config implies and is made when read, on the requested device and dtype.

    Values: x = mean + std * z, z ~ approximately N(0, 1) (Irwin-Hall sum of 4 uniforms), with
    eaas.model.tiny._random_init's scales: norms 1 + 0.1 z, embeddings z, biases 0.05 z, other
    matrices gain / sqrt(fan_in) * z with gain 2.4 for routers (tokens spread over experts), 0.5
    for output projections (o_proj, down_proj, w2), else 1 (finite in bf16 through 48 layers).
    z comes from a counter-based integer hash of (seed, tensor name, flat index), computed with
    exact int64 ops and one float32 multiply: the bits are the same on every device and in every
    process, and `read(n, torch.bfloat16)` equals `read(n, torch.float32).to(torch.bfloat16)`.
    (make_random's lm_head tweak against greedy repetition is not applied.)
    """

    load_format = "dummy"

    def __init__(self, path: Path, config: ModelConfig, eos_token_ids: tuple[int, ...],
                 bos_token_id: int | None, *, seed: int) -> None:
        shapes = dict(layout.non_expert_shapes(config))
        h, f = config.hidden_size, config.moe_intermediate_size
        for layer in range(config.num_hidden_layers):
            if config.is_moe_layer(layer):
                for e in range(config.num_experts):
                    for key, name in layout.expert_names(config, layer, e).items():
                        shapes[name] = (h, f) if key == "down" else (f, h)
        super().__init__(path, config, dict.fromkeys(shapes, _DUMMY_FILE), shapes,
                         eos_token_ids, bos_token_id)
        self.seed = seed
        raw = config.raw.get("torch_dtype") or config.raw.get("dtype")
        self.stored_dtype = _DUMMY_DTYPES.get(str(raw).removeprefix("torch."), torch.float32)

    def _missing(self, name: str) -> NoReturn:
        raise CheckpointError(f"{self.path}: missing tensor {name!r} (not a tensor of this "
                              f"{self.config.model_type} config; load_format='dummy')")

    def _load(self, name: str, index: int | None, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> torch.Tensor:
        assert index is None, "dummy checkpoints name experts one by one"
        shape = self._shapes[name]
        mean, std = _dummy_scale(name, shape)
        tensor = dummy_values(_dummy_key(self.seed, name), shape, mean, std,
                              dtype or self.stored_dtype, device)
        self._stats["tensors_read"] += 1
        self._stats["bytes_read"] += tensor.numel() * tensor.element_size()
        return tensor


def _dummy_scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a dummy tensor, as eaas.model.tiny._random_init scales them."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name.endswith((".bias", "e_score_correction_bias")):
        return 0.0, 0.05
    if name.endswith("gate.weight"):  # routers (and shared_expert_gate), not gate_proj
        gain = 2.4
    elif name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")):
        gain = 0.5
    else:
        gain = 1.0
    return 0.0, gain / shape[-1] ** 0.5


def _dummy_key(seed: int, name: str) -> tuple[int, int, int]:
    """Three 32-bit keys of (seed, name), stable across processes (no Python hash())."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=12).digest()
    return tuple(int.from_bytes(digest[i:i + 4], "little") for i in (0, 4, 8))  # type: ignore


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (hash-prospector's [16 21f0aaad 15 735a2d97 15]) of int64 x in
    [0, 2^32), in place; both multipliers are < 2^31, so no product overflows int64."""
    x.bitwise_xor_(x >> 16).mul_(0x21F0AAAD).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(0x735A2D97).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def dummy_values(key: tuple[int, int, int], shape: tuple[int, ...], mean: float, std: float,
                 dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A `shape` tensor of mean + std * z made on `device`: element i (flat index) gets
    h1 = mix(mix(i + k0) ^ k1), h2 = mix(h1 ^ k2), z = (sum of the four 16-bit halves of h1
    and h2 - 131070) / 37837.2 (float32), then cast to `dtype`."""
    numel = math.prod(shape)
    if numel >= 1 << 32:
        raise ValueError(f"dummy tensor of {numel} elements: at most 2^32 - 1 supported")
    k0, k1, k2 = key
    scale = std / _IH_STD
    out = torch.empty(numel, dtype=dtype, device=device)
    for start in range(0, numel, _CHUNK):
        x = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int64, device=device)
        h1 = _mix32(_mix32(x.add_(k0).bitwise_and_(_M32)).bitwise_xor_(k1))
        h2 = _mix32(h1.bitwise_xor(k2))
        s = (h1 & 0xFFFF).add_(h1 >> 16).add_(h2 & 0xFFFF).add_(h2 >> 16).sub_(_IH_MEAN)
        z = s.to(torch.float32).mul_(scale)
        out[start:start + z.numel()] = z.add_(mean) if mean else z
    return out.view(shape)
