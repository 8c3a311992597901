"""The model on a CUDA device: same logits/tokens as on CPU; batch-invariant rows on the GPU."""

from __future__ import annotations

import pytest
import torch

from eaas.model import ARCHS, Checkpoint, ExpertBank, DecoderModel
from tests.model.test_paged_batch import SCHEDULE, _run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_matches_cpu(tiny_dir, arch):
    ckpt = Checkpoint.open(tiny_dir(arch))
    cpu = DecoderModel.load(ckpt)
    gpu = DecoderModel.load(ckpt, device="cuda")
    ids = torch.arange(5, 25)
    want = cpu.forward(ids, cpu.new_cache())
    got = gpu.forward(ids.cuda(), gpu.new_cache()).cpu()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    assert gpu.generate_greedy(ids.tolist(), 16) == cpu.generate_greedy(ids.tolist(), 16)
    half = DecoderModel.load(ckpt, dtype=torch.bfloat16, device="cuda")
    logits = half.forward(ids.cuda(), half.new_cache()).cpu()
    assert float((logits - want).abs().max() / want.abs().max()) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_batch_invariant_rows(tiny_dir, arch, dtype):
    ckpt = Checkpoint.open(tiny_dir(arch))
    cfg = ckpt.config
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    bank = ExpertBank.load(ckpt, layer, range(cfg.num_experts), dtype, "cuda", batch_invariant=True)
    model = DecoderModel.load(
        ckpt, dtype=dtype, device="cuda", load_experts=False, batch_invariant=True
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, cfg.hidden_size, generator=gen).to("cuda", dtype)
    ids = torch.randint(0, cfg.num_experts, (33,), generator=gen).cuda()
    out = bank.forward(x, ids)
    topk_ids, topk_w = model.layers[layer].router(x)
    normed, logits = model.layers[layer].ffn_input(x), model.lm_head(model.final_norm(x))
    for n in range(33):
        row = x[n : n + 1]
        assert torch.equal(model.layers[layer].ffn_input(row)[0], normed[n]), f"norm row {n}"
        assert torch.equal(model.lm_head(model.final_norm(row))[0], logits[n]), f"head row {n}"
        assert torch.equal(bank.forward(x[n : n + 1], ids[n : n + 1])[0], out[n]), f"expert row {n}"
        i1, w1 = model.layers[layer].router(x[n : n + 1])
        assert torch.equal(i1[0], topk_ids[n]) and torch.equal(w1[0], topk_w[n]), f"router row {n}"


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_batch_equals_each_sequence_alone(tiny_dir, arch, batch_invariant):
    """Batched steps over one paged cache on the GPU (float32; paged decode kernel, fused MoE):
    bitwise each sequence alone when batch_invariant, else within 1e-4."""
    model = DecoderModel.load(Checkpoint.open(tiny_dir(arch)), device="cuda",
                              batch_invariant=batch_invariant)
    _run(model, SCHEDULE, exact=batch_invariant, tol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_cuda_bank_host_ids_equal_device_ids(tiny_dir, arch):
    """Expert ids on the host (as work units carry them) are checked and mapped without a device
    sync; the rows are bitwise those of device ids, and an id not hosted is refused either way."""
    ckpt = Checkpoint.open(tiny_dir(arch))
    cfg = ckpt.config
    layer = next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    hosted = list(range(1, cfg.num_experts, 2))
    bank = ExpertBank.load(ckpt, layer, hosted, torch.float32, "cuda")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, cfg.hidden_size, generator=gen).cuda()
    ids = torch.tensor(hosted)[torch.randint(0, len(hosted), (33,), generator=gen)]  # [33] host
    assert torch.equal(bank.forward(x, ids), bank.forward(x, ids.cuda()))
    for bad in (0, cfg.num_experts + 3, -1):
        wrong = ids.clone()
        wrong[5] = bad
        for where in ("cpu", "cuda"):
            with pytest.raises(ValueError, match="not hosted"):
                bank.forward(x, wrong.to(where))


def test_upload_does_not_wait_for_queued_gpu_work():
    """ops.upload queues its copy (pinned memory); a pageable upload would wait ~1 s here."""
    import time

    from eaas.model.ops import upload

    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued on the stream
    t0 = time.perf_counter()
    t = upload([5, 6, 7], "cuda")
    dt = time.perf_counter() - t0
    assert not torch.cuda.current_stream().query()  # the sleep is still running
    assert dt < 0.2, f"upload took {dt:.3f} s: it waited for the queued work"
    torch.cuda.synchronize()
    assert t.tolist() == [5, 6, 7] and t.device.type == "cuda"
