"""benchmarks/decode_peer.py: the peer's cached decode step (sort-based dispatch, both expert
paths) gives the logits of a straightforward recomputation (no cache, per-token attention,
dense per-token expert loop), greedy tokens agree over several steps, the dispatch matches a
dense loop over odd T with absent experts, the floor formula reproduces GPU.md's figures, and
the CPU smoke prints its table. float32 on CPU: tolerance 1e-4 relative to the logits' scale."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


def _load():
    spec = importlib.util.spec_from_file_location("decode_peer", ROOT / "benchmarks" /
                                                  "decode_peer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["decode_peer"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


dp = _load()
SHAPE = dp.PeerShape.from_dict(dp.SMOKE_SHAPE)
IMPLS = ["loop"] + (["grouped_mm"] if dp._resolve_experts("auto", torch.device("cpu"),
                                                          torch.float32) == "grouped_mm" else [])


def _peer(experts: str, seed: int = 1) -> dp.DecodePeer:
    return dp.DecodePeer(SHAPE, "cpu", dtype=torch.float32, seed=seed, experts=experts)


# ---- the straightforward recomputation ------------------------------------------------------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """HF rotate-half RoPE of one position: x [heads, d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (position * inv).to(torch.float32)
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _expert(lw, e: int, x: torch.Tensor) -> torch.Tensor:
    f = SHAPE.moe_intermediate_size
    gate, up, down = lw.w_gate_up[e, :f], lw.w_gate_up[e, f:], lw.w_down[e]
    return down @ (F.silu(gate @ x) * (up @ x))


def _moe_dense(lw, x: torch.Tensor) -> torch.Tensor:
    """Per token: softmax over E, top K, renormalise, weighted sum of the K expert outputs."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = (lw.w_router @ x[t]).softmax(-1)
        w, ids = probs.topk(SHAPE.num_experts_per_tok)
        w = w / w.sum()
        for wk, e in zip(w.tolist(), ids.tolist()):
            out[t] += wk * _expert(lw, e, x[t])
    return out


def reference_logits(peer, seq: list[int]) -> torch.Tensor:
    """Logits [V] after the last token of `seq`, recomputed from scratch (no cache)."""
    s = SHAPE
    nq, nkv, d, eps = s.num_attention_heads, s.num_key_value_heads, s.head_dim, s.rms_norm_eps
    x = peer.embed[torch.tensor(seq)]  # [P, H]
    for lw in peer.layers:
        h = _rms(x, lw.ln1, eps)
        wq, wk, wv = lw.wqkv.split([nq * d, nkv * d, nkv * d])
        qn, kn = lw.qk_norm[0], lw.qk_norm[nq]
        n = len(seq)
        q = [_rope(_rms((wq @ h[t]).view(nq, d), qn, eps), t, s.rope_theta) for t in range(n)]
        k = [_rope(_rms((wk @ h[t]).view(nkv, d), kn, eps), t, s.rope_theta) for t in range(n)]
        v = [(wv @ h[t]).view(nkv, d) for t in range(n)]
        att = torch.zeros(len(seq), nq * d)
        for t in range(len(seq)):
            for head in range(nq):
                g = head // (nq // nkv)
                keys = torch.stack([k[j][g] for j in range(t + 1)])  # [t+1, d]
                p = (keys @ q[t][head] / d ** 0.5).softmax(-1)
                att[t, head * d:(head + 1) * d] = p @ torch.stack([v[j][g] for j in range(t + 1)])
        x = x + att @ lw.wo.T
        x = x + _moe_dense(lw, _rms(x, lw.ln2, eps))
    return peer.lm_head @ _rms(x[-1], peer.norm, eps)


# ---- tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("experts", IMPLS)
def test_cached_decode_matches_recomputation(experts):
    peer = _peer(experts)
    batch, prompt_len, steps = 3, 5, 3
    gen = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, SHAPE.vocab_size, (batch, prompt_len), generator=gen)
    st = peer.new_state(batch, prompt_len + steps)
    seqs = [row.tolist() for row in prompts]
    logits = [peer.prefill(st, prompts)]
    st.pos.fill_(prompt_len)
    for _ in range(steps):
        for b in range(batch):
            seqs[b].append(int(st.tokens[b]))
        _, lg = peer.decode_step(st)
        logits.append(lg.clone())
    assert int(st.pos) == prompt_len + steps
    for i, lg in enumerate(logits):  # step i saw prompt + i generated tokens
        want = torch.stack([reference_logits(peer, seqs[b][:prompt_len + i])
                            for b in range(batch)])
        torch.testing.assert_close(lg, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4,
                                   msg=lambda m: f"step {i}: {m}")
        want_tokens = want.argmax(-1).tolist()
        got_tokens = [seqs[b][prompt_len + i] if i < steps else int(st.tokens[b])
                      for b in range(batch)]
        assert got_tokens == want_tokens, f"greedy tokens differ at step {i}"


@pytest.mark.parametrize("num_tokens", [1, 33, 511])
def test_dispatch_matches_dense_loop_with_absent_experts(num_tokens):
    peers = {impl: _peer(impl, seed=2) for impl in IMPLS}
    lw = peers["loop"].layers[0]
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, SHAPE.hidden_size, generator=gen)
    # route to the even experts only: the odd ones are absent (empty groups)
    scores = torch.rand(num_tokens, SHAPE.num_experts // 2, generator=gen)
    w, half = scores.topk(SHAPE.num_experts_per_tok, -1)
    ids, w = half * 2, (w / w.sum(-1, keepdim=True))
    want = torch.zeros_like(x)
    for t in range(num_tokens):
        for wk, e in zip(w[t].tolist(), ids[t].tolist()):
            want[t] += wk * _expert(lw, e, x[t])
    for impl, peer in peers.items():
        got = peer.moe_experts(peer.layers[0], x, ids, w)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{impl}: {m}")


def test_offsets_are_cumsum_of_bincount():
    ids = torch.tensor([[5, 0], [0, 3], [5, 15]])
    sorted_ids, _ = ids.flatten().sort(stable=True)
    offs = torch.searchsorted(sorted_ids, torch.arange(16), right=True, out_int32=True)
    want = torch.bincount(ids.flatten(), minlength=16).cumsum(0).to(torch.int32)
    assert offs.tolist() == want.tolist()


def test_weight_read_floor_reproduces_gpu_md():
    """GPU.md (1x H200, 4.24 TB/s, 48 layers, vocab 151936): 1.41 / 12.4 / 14.2 ms at B = 1 /
    32 / 128; at B = 1 the formula counts exactly K experts per layer."""
    from eaas.model.tiny import QWEN3_30B_A3B

    got = [dp.weight_read_floor(QWEN3_30B_A3B, b, 48, 151936, 4.24e12) for b in (1, 32, 128)]
    for g, want in zip(got, (1.41, 12.4, 14.2)):
        assert abs(g - want) / want < 0.02, (got, want)
    s = dp.PeerShape.from_dict(QWEN3_30B_A3B, 1, 1000)
    expert = 3 * s.hidden_size * s.moe_intermediate_size * 2
    one = dp.step_read_bytes(s, 1)
    two = dp.step_read_bytes(s, 2)  # 2 tokens: 8 + 8 (1 - 8/128) distinct experts, 1 more row
    assert two - one == pytest.approx(8 * (1 - 8 / 128) * expert + 2 * s.hidden_size, rel=1e-9)
    kv = dp.step_read_bytes(s, 4, context=100) - dp.step_read_bytes(s, 4)
    assert kv == 2 * 4 * 100 * s.num_key_value_heads * s.head_dim * 2


def test_smoke_main_prints_every_row(tmp_path, capsys):
    out_json = tmp_path / "peer.json"
    res = dp.main(["--smoke", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert "# decode_peer --smoke" in text and "tok/s = B / (ms/step / 1000)" in text
    assert "E(1-(1-K/E)^B)" in text and "TTFT" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| batch |"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:]
            if line.startswith("|")]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 6), (4, 6), (8, 6), (2, 24)]
    for r in rows:
        assert r[2] == "-" and float(r[4]) > 0 and float(r[5]) > 0, r  # no graph on CPU
    saved = json.loads(out_json.read_text())
    assert len(saved["rows"]) == 4 and saved["ttft"]["ttft_ms"] > 0
    assert res["rows"][0]["experts"] == IMPLS[-1]
