"""Router kernels vs their references (CPU interpreter), and the references vs Hugging Face."""

from __future__ import annotations

import pytest
import torch

from eaas_kernels import reference as ref
from eaas_kernels import topk_grouped_sigmoid, topk_softmax
from eaas_kernels.topk_gating import topk_grouped_sigmoid_triton, topk_softmax_triton

from .conftest import distinct_logits, interpreter_only


@interpreter_only
@pytest.mark.parametrize("num_tokens", [1, 33, 130])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_softmax_triton_matches_reference(num_tokens, k, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 10 + k)
    logits = distinct_logits(num_tokens, 60, gen).to(dtype)  # E = 60: not a power of two
    for renormalize in (False, True):
        got = topk_softmax_triton(logits, k, renormalize)
        want = ref.topk_softmax_ref(logits, k, renormalize)
        torch.testing.assert_close(got.topk_ids, want.topk_ids, rtol=0, atol=0)
        torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize("num_tokens", [1, 33, 130])
@pytest.mark.parametrize(("k", "n_group", "topk_group"), [(1, 4, 1), (2, 8, 3), (8, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_grouped_sigmoid_triton_matches_reference(num_tokens, k, n_group, topk_group, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 100 + k)
    logits = distinct_logits(num_tokens, 64, gen).to(dtype)
    bias = torch.randn(64, generator=gen) * 0.05
    for renormalize, scale in ((True, 2.5), (False, 1.0)):
        args = (k, n_group, topk_group, scale, renormalize)
        got = topk_grouped_sigmoid_triton(logits, bias, *args)
        want = ref.topk_grouped_sigmoid_ref(logits, bias, *args)
        torch.testing.assert_close(got.topk_ids, want.topk_ids, rtol=0, atol=0)
        torch.testing.assert_close(got.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)
    no_bias = topk_grouped_sigmoid_triton(logits, None, k, n_group, topk_group, 1.0, True)
    want = ref.topk_grouped_sigmoid_ref(logits, None, k, n_group, topk_group, 1.0, True)
    torch.testing.assert_close(no_bias.topk_ids, want.topk_ids, rtol=0, atol=0)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_softmax_reference_matches_hf_qwen3_router(norm_topk_prob):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=24, num_experts_per_tok=4,
                         norm_topk_prob=norm_topk_prob)
    router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = torch.randn(33, 32, generator=torch.Generator().manual_seed(1))
    logits, hf_weights, hf_ids = router(hidden)
    got = topk_softmax(logits, 4, norm_topk_prob)  # CPU: dispatches to the reference
    torch.testing.assert_close(got.topk_ids, hf_ids, rtol=0, atol=0)
    torch.testing.assert_close(got.topk_weights, hf_weights.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_grouped_reference_matches_hf_deepseek_v3_router(norm_topk_prob):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                           topk_group=3, routed_scaling_factor=2.5, norm_topk_prob=norm_topk_prob)
    router = DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(2)
    router.weight.data = torch.randn(64, 32, generator=gen) * 0.5
    router.e_score_correction_bias.data = torch.randn(64, generator=gen) * 0.1
    hidden = torch.randn(130, 32, generator=gen)
    logits, hf_weights, hf_ids = router(hidden)
    got = topk_grouped_sigmoid(logits, router.e_score_correction_bias, 6, 8, 3, 2.5, norm_topk_prob)
    # HF's final topk is unsorted: compare the chosen sets, weights aligned by id
    hf_order = hf_ids.argsort(dim=-1)
    got_order = got.topk_ids.argsort(dim=-1)
    torch.testing.assert_close(got.topk_ids.gather(1, got_order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(got.topk_weights.gather(1, got_order),
                               hf_weights.gather(1, hf_order), rtol=1e-6, atol=1e-7)


def test_bad_arguments_say_what_is_allowed():
    logits = torch.randn(4, 64)
    with pytest.raises(ValueError, match="n_group must divide"):
        topk_grouped_sigmoid(logits, None, 2, 5, 1, 1.0, True)
    with pytest.raises(ValueError, match="exceeds the experts"):
        topk_grouped_sigmoid(logits, None, 9, 8, 1, 1.0, True)
    with pytest.raises(ValueError, match=r"k must be in \[1, E=64\]"):
        topk_softmax(logits, 65, True)
