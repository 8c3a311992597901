"""The model's router on CUDA calls eaas_kernels' gating functions. Run here on CPU tensors,
those dispatch to their pure-torch references (which tests/kernels holds equal to the Triton
kernels and to Hugging Face's routers), so this checks the wiring: the CUDA branch passes k,
renormalisation, bias, groups and scaling exactly as the model's own router means them."""

from __future__ import annotations

import pytest
import torch

from eaas.model import ARCHS, Checkpoint, DecoderModel, make_tiny


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_router_branch_matches_the_model_router(arch, tmp_path):
    model = DecoderModel.load(Checkpoint.open(make_tiny(tmp_path / arch, arch, seed=3)))
    g = torch.Generator().manual_seed(0)
    for layer in model.layers:
        if not layer.is_moe:
            continue
        router = layer._router
        x = torch.randn(33, model.config.hidden_size, generator=g)
        ids, weights = router._route(x)
        k_ids, k_weights = router._route_cuda(x)
        assert torch.equal(k_ids, ids), arch
        torch.testing.assert_close(k_weights, weights, rtol=1e-6, atol=1e-7)
