"""GPU test helpers: skip markers, and an environment for child processes (PYTHONPATH, no
multicast) so spawned servers import this checkout."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from eaas.gpu import gpu_env
from tests.engine.conftest import tiny_dirs  # noqa: F401  (session fixture, shared)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
cuda_only = pytest.mark.skipif(NUM_GPUS < 1, reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(NUM_GPUS < 2, reason="needs two CUDA GPUs")


def child_env() -> dict[str, str]:
    env = gpu_env(nics=[])
    paths = [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


PYTHON = sys.executable


@pytest.fixture
def child_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server processes (`python -m eaas.engine.server_main`) import this tree, with this
    GPU environment (no multicast)."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    for key, value in child_env().items():
        if key.startswith(("NVSHMEM_", "NCCL_", "TORCH_SYMM")):
            monkeypatch.setenv(key, value)
    assert os.path.isdir(ROOT)
