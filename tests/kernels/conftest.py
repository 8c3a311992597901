"""Kernel tests: on a machine without CUDA the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel (when triton and the kernel modules
are imported) and again while launching. So it is set here, before anything of ours imports triton,
while the kernel modules are imported, and by an autouse fixture during each test of this folder
only; otherwise it is put back, so other test folders see the environment they started with (they
reach the kernels only through `eaas_kernels.*` dispatch, which never runs Triton on CPU).
On a CUDA machine nothing is interpreted: the CPU-interpreter tests skip and the `cuda` tests run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
KERNEL_MODULES = ("eaas_kernels.topk_gating", "eaas_kernels.moe_align", "eaas_kernels.grouped_gemm",
                  "eaas_kernels.nvlink_p2p", "eaas_kernels.invariant",
                  "eaas_kernels.paged_attention", "eaas_kernels.rope_cache")


INTERPRET = not HAS_CUDA


@contextmanager
def _interpreter_env(on: bool) -> Iterator[None]:
    saved = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


with _interpreter_env(INTERPRET):
    for _name in KERNEL_MODULES:
        if _name in sys.modules:  # imported earlier without the interpreter: decorate again
            importlib.reload(sys.modules[_name])
        else:
            importlib.import_module(_name)


@pytest.fixture(autouse=True)
def _triton_interpreter() -> Iterator[None]:
    """Triton also reads TRITON_INTERPRET while launching: keep it on during these tests only."""
    with _interpreter_env(INTERPRET):
        yield


interpreter_only = pytest.mark.skipif(
    HAS_CUDA, reason="CPU-interpreter test; on a CUDA machine the cuda-marked tests cover it"
)
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def distinct_logits(num_tokens: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """[T, E] float32 logits with no ties per row, exact in float16 and bfloat16 too (multiples
    of 1/16 up to E/8 in magnitude), so top-k choices are unambiguous in every dtype."""
    perms = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(num_tokens)])
    return (perms.float() - num_experts / 2) / 8  # [T, E]


def moe_weights(
    num_experts: int, hidden: int, ffn: int, dtype: torch.dtype, gen: torch.Generator, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """w_gate_up [E, 2F, H] and w_down [E, H, F], scaled so every stage stays O(1)."""
    w_gate_up = torch.randn(num_experts, 2 * ffn, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, ffn, generator=gen) / ffn**0.5
    return w_gate_up.to(device, dtype), w_down.to(device, dtype)


# float32 on the CPU interpreter and IEEE products on GPU; half: both round act and y to dtype
# but may round differently at a tie of the float32 accumulations, hence one ulp-ish margin.
TOLERANCE = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
