"""End-to-end decode throughput on GPUs (issue 8): a Qwen3-30B-A3B-shaped random model (layers cut
by --layers), batch 1 / 32 / 128, three setups in one run:

  (a) eaas disaggregated on 2 GPUs: attention shard on cuda:0, expert servers as OS processes on
      cuda:1, rows over cudaipc://
  (b) eaas co-located on 1 GPU: shard and in-process expert servers on cuda:0
  (c) the peer: transformers `generate` on cuda:0 (same checkpoint, greedy, same dtype)

each eaas setup in both batch_invariant modes, after a warm-up at the same batch size.

decode tokens/s (eaas) = tokens streamed after the last request of the batch got its first token
                         / (time the last request finished - that moment)
decode tokens/s (transformers) = B x (N - 1) / (time of step N - time of step 1), stamped by a
                         generate streamer (each stamp follows a device -> host copy, so it syncs)
end-to-end tokens/s = B x N / wall time of the whole batch (prefill included)

A timed batch stops at --budget-s (default 60 s; batch_invariant=True runs rows one by one and
can be slow at batch 128): its requests are aborted and the row is marked partial.

    python benchmarks/bench_e2e_gpu.py [--layers 8] [--batches 1,32,128] [--tokens 32]
    python benchmarks/bench_e2e_gpu.py --smoke        # CPU, tiny shape, tcp://, < 30 s

Needs no install on a GPU machine: it puts the checkout on sys.path and on the expert-server
processes' PYTHONPATH, and turns NVLink multicast off.
`bench_scale.py` reuses the helpers here.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# the tiny shape of --smoke runs (CPU): every MoE layer, 16 experts, top-4
SMOKE_SHAPE: dict[str, Any] = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
    num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=64, num_hidden_layers=2,
    mlp_only_layers=[])


def setup_paths() -> None:
    """Make `eaas` and `eaas_kernels` importable here and in child processes, multicast off."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(ROOT)] + old))
    os.environ.update({"NVSHMEM_DISABLE_NVLS": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NCCL_NVLS_ENABLE": "0"})
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


setup_paths()

import torch  # noqa: E402

from eaas import AsyncEngine, EngineConfig, SamplingParams  # noqa: E402
from eaas.model.tiny import QWEN3_30B_A3B, make_random  # noqa: E402


def num_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine_line() -> str:
    """`date, card(s) or CPU, torch version` for a table header."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    n = num_gpus()
    if n:
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        hw = f"{n}x {' + '.join(names)}"
    else:
        hw = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
    return f"{when}; {hw}; torch {torch.__version__}; OMP_NUM_THREADS=" \
           f"{os.environ.get('OMP_NUM_THREADS')}"


def make_model(out_dir: str | Path, *, smoke: bool, layers: int, seed: int = 0) -> Path:
    """The benchmark checkpoint: Qwen3-30B-A3B shape with `layers` layers, bf16 (generated on
    the GPU when there is one); --smoke: SMOKE_SHAPE, float32. A folder that already holds a
    config.json is reused as it is (pass the same --model-dir to several runs)."""
    if (Path(out_dir) / "config.json").exists():
        return Path(out_dir)
    if smoke:
        return make_random(out_dir, "qwen3_moe", seed=seed, dtype="float32", **SMOKE_SHAPE)
    init = "cuda:0" if num_gpus() else "cpu"
    return make_random(out_dir, "qwen3_moe", seed=seed, dtype="bfloat16", init_device=init,
                       **{**QWEN3_30B_A3B, "num_hidden_layers": layers})


def model_line(model_dir: str | Path) -> str:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    return (f"qwen3_moe random weights: H={c['hidden_size']} heads={c['num_attention_heads']}/"
            f"{c['num_key_value_heads']}x{c['head_dim']} E={c['num_experts']} "
            f"K={c['num_experts_per_tok']} F={c['moe_intermediate_size']} "
            f"layers={c['num_hidden_layers']} vocab={c['vocab_size']} {c['torch_dtype']}")


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` random token ids (same length: transformers needs no padding)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


class TokenClock:
    """Stamps of streamed tokens: (time, request index, tokens so far)."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, int, int]] = []

    def tokens_between(self, a: float, b: float) -> int:
        """Tokens that arrived in [a, b)."""
        last: dict[int, int] = {}
        n = 0
        for t, i, k in self.stamps:  # in arrival order: count each request's increments
            if a <= t < b:
                n += k - last.get(i, 0)
            last[i] = k
        return n


async def run_batch(engine: AsyncEngine, batch: list[list[int]], n_tokens: int,
                    budget_s: float) -> dict:
    """All of `batch` at once, N greedy tokens each; stop early (aborting) after budget_s."""
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    clock = TokenClock()
    first: dict[int, float] = {}
    finish: dict[int, str | None] = {}
    finished_at: dict[int, float] = {}

    async def one(i: int, p: list[int]) -> None:
        async for out in engine.generate(p, params):
            t = time.perf_counter()
            k = len(out.outputs[0].token_ids)
            clock.stamps.append((t, i, k))
            first.setdefault(i, t)
            if out.finished:
                finish[i] = out.finish_reason
                finished_at[i] = t

    t0 = time.perf_counter()
    partial = False
    try:
        await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(batch))),
                               budget_s)
    except TimeoutError:
        partial = True
    t_end = time.perf_counter()
    total = clock.tokens_between(t0, t_end + 1)
    t_first = max(first.values()) if len(first) == len(batch) else t_end
    decode = clock.tokens_between(t_first + 1e-9, t_end + 1)
    lost = sum(1 for i in range(len(batch)) if finish.get(i) != "length")
    # steady: from the last first token to the first finish, every request of the batch decodes
    t_fin = min(finished_at.values(), default=t_end)
    steady = clock.tokens_between(t_first + 1e-9, t_fin - 1e-9)
    return {"decode_tok_s": decode / (t_end - t_first) if t_end > t_first else float("nan"),
            "steady_tok_s": steady / (t_fin - t_first) if t_fin > t_first and steady
            else float("nan"),
            "e2e_tok_s": total / (t_end - t0), "tokens": total, "wall_s": t_end - t0,
            "partial": partial, "not_length": 0 if partial else lost}


def eaas_config(model: str | Path, *, setup: str, batch_invariant: bool, smoke: bool,
                servers: int, max_batch: int, dtype: str) -> EngineConfig:
    """setup "a": shard on cuda:0, server processes on cuda:1 (cudaipc://); "n": the same with
    ONE server over nvshmem:// (one NVSHMEM rank per GPU); "b": all in-process on cuda:0.
    On --smoke "a" and "b" run on CPU, "a" over tcp://."""
    if setup in ("a", "n"):
        placement = {"server_mode": "process",
                     "transport": "tcp" if smoke else ("cudaipc" if setup == "a" else "nvshmem"),
                     "server_devices": None if smoke else ["cuda:1"]}
        if setup == "n":
            servers = 1
    else:
        placement = {"server_mode": "inproc"}
    return EngineConfig.from_dict({
        "model": str(model), "dtype": dtype, "device": "cpu" if smoke else "cuda:0",
        "batch_invariant": batch_invariant,
        "placement": {"num_attention_shards": 1, "num_expert_servers": servers,
                      "expert_replicas": 1, **placement},
        "batching": {"max_batch_tokens": 8192, "max_wait_us": 200},
        "scheduler": {"max_num_seqs": max(max_batch, 1), "max_waiting": 4096},
        # a cold Triton compile can outlast a short unit timeout and cause resends
        "fault": {"unit_timeout_s": 5.0 if smoke else 60.0, "heartbeat_interval_s": 0.5}})


async def bench_eaas(cfg: EngineConfig, ps: list[list[int]], batches: list[int], n_tokens: int,
                     budget_s: float) -> dict[int, dict]:
    out: dict[int, dict] = {}
    t0 = time.perf_counter()
    async with AsyncEngine(cfg) as engine:
        start_s = time.perf_counter() - t0
        for b in batches:
            # warm-up at the same batch size (kernels compile per shape bucket)
            await run_batch(engine, ps[:b], min(4, n_tokens), max(5.0, budget_s / 4))
            out[b] = await run_batch(engine, ps[:b], n_tokens, budget_s)
            out[b]["start_s"] = start_s
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next setup gets the memory back
    return out


class _Stamps:
    """A transformers generate streamer that only stamps each step (put: prompt, then tokens)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value: Any) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_transformers(model_dir: str | Path, ps: list[list[int]], batches: list[int],
                       n_tokens: int, *, device: str, dtype: str) -> dict[int, dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    out: dict[int, dict] = {}
    for b in batches:
        ids = torch.tensor(ps[:b], device=device)  # [B, P]

        def gen(n: int, streamer: Any = None) -> torch.Tensor:
            with torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
                                      streamer=streamer)

        gen(min(4, n_tokens))  # warm-up
        s = _Stamps()
        t0 = time.perf_counter()
        res = gen(n_tokens, s)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        steps = s.t[1:]  # s.t[0]: the prompt
        assert res.shape[1] == ids.shape[1] + n_tokens and len(steps) == n_tokens
        decode = b * (n_tokens - 1) / (steps[-1] - steps[0]) if n_tokens > 1 else float("nan")
        out[b] = {"decode_tok_s": decode, "e2e_tok_s": b * n_tokens / wall, "wall_s": wall,
                  "partial": False, "not_length": 0}
    return out


def print_table(title: list[str], rows: list[tuple[str, str, int, dict]],
                peer: dict[int, dict]) -> None:
    for line in title:
        print(f"# {line}")
    print("| setup | batch_invariant | batch | decode tok/s | end-to-end tok/s | decode vs "
          "transformers | not finished by length |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, inv, b, r in rows:
        ref = peer.get(b, {}).get("decode_tok_s")
        ratio = f"{r['decode_tok_s'] / ref:.2f}x" if ref and name != "transformers" else "-"
        mark = " (partial: budget)" if r.get("partial") else ""
        print(f"| {name} | {inv} | {b} | {r['decode_tok_s']:.1f}{mark} | {r['e2e_tok_s']:.1f} | "
              f"{ratio} | {r['not_length']} |")


async def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack (a hang)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, tcp://, < 30 s")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the Qwen3 shape")
    ap.add_argument("--batches", default=None, help="comma list (default 1,32,128; smoke 1,4,8)")
    ap.add_argument("--tokens", type=int, default=None, help="greedy tokens per request")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--servers", type=int, default=2, help="expert servers per eaas setup")
    ap.add_argument("--setups", default="a,b,c", help="a: 2-GPU eaas over cudaipc, n: 2-GPU "
                    "eaas over nvshmem (1 server), b: 1-GPU eaas, c: transformers")
    ap.add_argument("--invariant", default="false,true", help="batch_invariant modes for eaas")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="cap per timed batch; a capped row is marked partial")
    ap.add_argument("--model-dir", default=None,
                    help="checkpoint folder: reused if it has config.json, else made there")
    ap.add_argument("--out", default=None, help="folder for results.json")
    args = ap.parse_args()
    smoke = args.smoke
    batches = [int(x) for x in (args.batches or ("1,4,8" if smoke else "1,32,128")).split(",")]
    n_tokens = args.tokens or (6 if smoke else 32)
    budget = args.budget_s or (20.0 if smoke else 60.0)
    setups = args.setups.split(",")
    modes = [m.strip().lower() == "true" for m in args.invariant.split(",")]
    dtype = "float32" if smoke else "bfloat16"
    gpus = num_gpus()
    if not smoke and gpus < 1:
        sys.exit("no CUDA GPU: run with --smoke on CPU")
    notes = []
    for two in ("a", "n"):
        if two in setups and not smoke and gpus < 2:
            setups.remove(two)
            notes.append(f"setup ({two}) skipped: it needs 2 GPUs, this machine has {gpus}")
    if smoke and "n" in setups:
        setups.remove("n")
        notes.append("setup (n) skipped: nvshmem:// needs GPUs")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = make_model(args.model_dir or Path(tmp) / "model", smoke=smoke,
                           layers=args.layers)
        make_s = time.perf_counter() - t0
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        shape = model_line(model)
        ps = prompts(max(batches), args.prompt_len, vocab)
        rows: list[tuple[str, str, int, dict]] = []
        names = {"a": "eaas 2 GPUs: shard cuda:0, servers cuda:1 over cudaipc://",
                 "n": "eaas 2 GPUs: shard cuda:0, 1 server cuda:1 over nvshmem://",
                 "b": "eaas 1 GPU: shard + in-process servers on cuda:0"}
        if smoke:
            names = {"a": "eaas (smoke, CPU): server processes over tcp://",
                     "b": "eaas (smoke, CPU): in-process servers"}
        results: dict[str, Any] = {}
        peer: dict[int, dict] = {}
        if "c" in setups:  # the peer first: a run cut short still has it
            peer = bench_transformers(model, ps, batches, n_tokens, device="cpu" if smoke
                                      else "cuda:0", dtype=dtype)
            results["transformers"] = peer
            rows += [("transformers", "-", b, peer[b]) for b in batches]
            for b in batches:
                print(f"# measured: transformers | batch {b} | decode "
                      f"{peer[b]['decode_tok_s']:.1f} tok/s | e2e {peer[b]['e2e_tok_s']:.1f}",
                      flush=True)
        for setup in [s for s in setups if s in ("a", "n", "b")]:
            for inv in modes if setup != "n" else modes[:1]:  # NVSHMEM: one job per process
                cfg = eaas_config(model, setup=setup, batch_invariant=inv, smoke=smoke,
                                  servers=args.servers, max_batch=max(batches), dtype=dtype)
                res = await bench_eaas(cfg, ps, batches, n_tokens, budget)
                results[f"{setup}-{inv}"] = res
                for b in batches:  # as measured: a run cut short still reports these
                    print(f"# measured: {names[setup]} | {inv} | batch {b} | decode "
                          f"{res[b]['decode_tok_s']:.1f} tok/s | e2e {res[b]['e2e_tok_s']:.1f}",
                          flush=True)
                rows += [(names[setup], str(inv), b, res[b]) for b in batches]
    print_table([
        f"bench_e2e_gpu{' --smoke' if smoke else ''}  {machine_line()}",
        shape + f"; checkpoint made in {make_s:.0f} s",
        f"{args.prompt_len}-token random prompts, {n_tokens} greedy tokens per request "
        f"(ignore_eos), all of a batch at once; warm-up at each batch size first; "
        f"{args.servers} expert servers x1 copy per eaas setup",
        ("peer in the same run: transformers generate (default attention, same dtype, "
         f"same checkpoint, on {'cpu' if smoke else 'cuda:0'})") if "c" in setups
        else "no peer run (--setups)",
        "decode tok/s (eaas) = tokens after the batch's last first-token / time from then to the "
        "end; (transformers) = B*(N-1) / (t_step_N - t_step_1); end-to-end = B*N / wall",
        *notes], rows, peer)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "e2e_results.json").write_text(json.dumps(
            {"machine": machine_line(), "rows": [{"setup": n, "batch_invariant": i, "batch": b,
                                                  **r} for n, i, b, r in rows]}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # after setup (n) NVSHMEM's collective finalize would wait on the dead server
