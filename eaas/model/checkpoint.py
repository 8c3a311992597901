"""Checkpoint: a Hugging Face checkpoint directory, read lazily tensor by tensor.

Nothing is read at `open` except config.json, the index and the safetensors headers (to check that
every tensor the architecture needs is there with the right shape). `read` and `read_expert` then
read exactly the tensors asked for; a server hosting experts {3, 7} of layer 5 reads six tensors
(or two slices of each fused tensor), never a whole file. `stats` counts what was read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import torch

from eaas.errors import CheckpointError
from eaas.model import layout
from eaas.model.config import ModelConfig
from eaas.model.tokenizer import Tokenizer

__all__ = ["Checkpoint"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class Checkpoint:
    """An opened checkpoint directory. Use `Checkpoint.open(path)`."""

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
    def open(cls, path: str | Path) -> Checkpoint:
        """Open and validate `path`; raise CheckpointError naming the file and field/tensor."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory does not exist")
        config = ModelConfig.from_file(path / "config.json")
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
        ckpt = cls(path, config, weight_map, shapes, eos, bos)
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
        tensor = self._load(name, None)
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
            out = {k: self._load(n, None) for k, n in source.items()}
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

    def _load(self, name: str, index: int | None) -> torch.Tensor:
        """Read tensor `name` (or its `index`-th slice along dim 0) from its file."""
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
