"""Fused MoE grouped GEMM (and the expert-rows variant) vs the references; references vs HF."""

from __future__ import annotations

import pytest
import torch

from eaas_kernels import MoEConfig, expert_rows, fused_moe
from eaas_kernels import reference as ref
from eaas_kernels.configs import GemmConfig
from eaas_kernels.grouped_gemm import expert_rows_triton, fused_moe_triton

from .conftest import TOLERANCE, interpreter_only, moe_weights

NUM_EXPERTS, HIDDEN, FFN = 12, 48, 40  # odd-ish: F not a multiple of the 32-wide K/N tiles
PRESENT = torch.tensor([1, 2, 5, 6, 9, 11])  # the other 6 experts get no tokens
SMALL = MoEConfig(block_m=16, gate_up=GemmConfig(32, 32, 4, 2, 1), down=GemmConfig(32, 32, 1, 2, 1))


def _routing(num_tokens: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(num_tokens, len(PRESENT), generator=gen)
    picks = scores.topk(k, dim=-1).indices  # distinct experts per token
    return PRESENT[picks], torch.rand(num_tokens, k, generator=gen)  # [T, K] ids, weights


@interpreter_only
@pytest.mark.parametrize("num_tokens", [1, 33, 130])
@pytest.mark.parametrize("k", [1, 2, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_triton_matches_reference(num_tokens, k, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 10 + k)
    w_gate_up, w_down = moe_weights(NUM_EXPERTS, HIDDEN, FFN, dtype, gen)
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
    topk_ids, topk_weights = _routing(num_tokens, k, gen)
    got = fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights, config=SMALL)
    want = ref.fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@interpreter_only
@pytest.mark.parametrize("num_rows", [1, 33, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expert_rows_triton_matches_reference(num_rows, dtype):
    gen = torch.Generator().manual_seed(num_rows)
    w_gate_up, w_down = moe_weights(NUM_EXPERTS, HIDDEN, FFN, dtype, gen)
    x = torch.randn(num_rows, HIDDEN, generator=gen).to(dtype)
    expert_ids = PRESENT[torch.randint(0, len(PRESENT), (num_rows,), generator=gen)]
    got = expert_rows_triton(x, expert_ids, w_gate_up, w_down, config=SMALL)
    want = ref.expert_rows_ref(x, expert_ids, w_gate_up, w_down)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@interpreter_only
def test_fused_moe_triton_default_config_eight_experts_per_token():
    """K = 8 with the heuristic config (block_m 16, BLOCK_K 128 > H: masked reduction)."""
    gen = torch.Generator().manual_seed(3)
    w_gate_up, w_down = moe_weights(16, HIDDEN, FFN, torch.float32, gen)
    x = torch.randn(33, HIDDEN, generator=gen)
    topk_ids = torch.rand(33, 16, generator=gen).topk(8, dim=-1).indices
    topk_weights = torch.rand(33, 8, generator=gen)
    got = fused_moe_triton(x, w_gate_up, w_down, topk_ids, topk_weights)
    want = ref.fused_moe_ref(x, w_gate_up, w_down, topk_ids, topk_weights)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_expert_rows_is_fused_moe_with_one_expert_per_row():
    gen = torch.Generator().manual_seed(4)
    w_gate_up, w_down = moe_weights(NUM_EXPERTS, HIDDEN, FFN, torch.float32, gen)
    x = torch.randn(9, HIDDEN, generator=gen)
    expert_ids = PRESENT[torch.randint(0, len(PRESENT), (9,), generator=gen)]
    rows = expert_rows(x, expert_ids, w_gate_up, w_down)
    one = fused_moe(x, w_gate_up, w_down, expert_ids[:, None], torch.ones(9, 1))
    torch.testing.assert_close(rows, one, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_reference_matches_hf_experts(arch):
    """HF's fused `*Experts` module (float32) is the oracle for the reference MoE."""
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig as Config
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts
        cfg = Config(hidden_size=HIDDEN, moe_intermediate_size=FFN, num_experts=NUM_EXPERTS)
    else:
        from transformers import DeepseekV3Config as Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3Experts as Experts,
        )
        cfg = Config(hidden_size=HIDDEN, moe_intermediate_size=FFN, n_routed_experts=NUM_EXPERTS)
    experts = Experts(cfg)
    gen = torch.Generator().manual_seed(5)
    w_gate_up, w_down = moe_weights(NUM_EXPERTS, HIDDEN, FFN, torch.float32, gen)
    experts.gate_up_proj.data, experts.down_proj.data = w_gate_up, w_down
    x = torch.randn(33, HIDDEN, generator=gen)
    topk_ids, topk_weights = _routing(33, 4, gen)
    with torch.no_grad():
        want = experts(x, topk_ids, topk_weights)
    got = fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mismatched_weights_are_rejected():
    gen = torch.Generator().manual_seed(6)
    w_gate_up, w_down = moe_weights(NUM_EXPERTS, HIDDEN, FFN, torch.float32, gen)
    x = torch.randn(3, HIDDEN)
    with pytest.raises(ValueError, match="w_down must be"):
        ids = torch.zeros(3, 1, dtype=torch.long)
        fused_moe(x, w_gate_up, w_down[:, :, :-1], ids, torch.ones(3, 1))
    with pytest.raises(TypeError, match="share one dtype"):
        expert_rows(x.half(), torch.zeros(3, dtype=torch.long), w_gate_up, w_down)
