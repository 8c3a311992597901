"""The `eaas` command: serve, generate, make-tiny, config.

Flags override the YAML file given by --config, which overrides the defaults; names follow
vLLM/SGLang where the concept matches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

# flag -> dotted EngineConfig field
_FLAGS: dict[str, tuple[str, type | None, str]] = {
    "--dtype": ("dtype", str, "float32 | bfloat16 | float16"),
    "--device": ("device", str, "cpu or cuda[:N]"),
    "--seed": ("seed", int, "engine seed (sampling without a per-request seed)"),
    "--served-model-name": ("served_model_name", str, "model name in the API (default: dir name)"),
    "--graph": ("graph", str, "dataflow graph YAML (default: the architecture's graph)"),
    "--num-attention-shards": ("placement.num_attention_shards", int, "attention shards"),
    "--num-expert-servers": ("placement.num_expert_servers", int, "expert servers"),
    "--expert-replicas": ("placement.expert_replicas", int, "copies of every expert"),
    "--placement": ("placement.strategy", str, "round_robin | contiguous | explicit"),
    "--server-mode": ("placement.server_mode", str, "inproc | process"),
    "--transport": ("placement.transport", str,
                    "tcp | shm | cudaipc | nvshmem (engine <-> server processes)"),
    "--max-num-seqs": ("scheduler.max_num_seqs", int, "running requests per shard"),
    "--load-format": ("load_format", str, "auto (safetensors) | dummy (random weights)"),
    "--max-num-batched-tokens": ("scheduler.max_num_batched_tokens", int,
                                 "tokens per step of a lane (longer prompts are chunked)"),
    "--max-waiting": ("scheduler.max_waiting", int, "queued requests before 503"),
    "--max-model-len": ("scheduler.max_model_len", int, "prompt + output token limit"),
    "--micro-batches": ("scheduler.micro_batches", int, "ping-pong lanes per shard"),
    "--block-size": ("cache.block_size", int, "KV cache block size in tokens (1, 2, 4, ..., 256)"),
    "--num-gpu-blocks-override": ("cache.num_blocks", int,
                                  "KV cache blocks per shard (default: sized from memory)"),
    "--gpu-memory-utilization": ("cache.gpu_memory_utilization", float,
                                 "share of each GPU's total memory this instance may use"),
    "--cpu-kv-cache-space-gib": ("cache.cpu_kv_cache_space_gib", float,
                                 "KV cache space on CPU (GiB, split among CPU shards)"),
    "--max-batch-tokens": ("batching.max_batch_tokens", int, "expert batch flush size (rows)"),
    "--max-wait-us": ("batching.max_wait_us", int, "expert batch flush timer"),
    "--no-replica-policy": ("fault.no_replica_policy", str, "fail | wait | degrade"),
    "--unit-timeout-s": ("fault.unit_timeout_s", float, "resend a work unit after this long"),
    "--max-restarts": ("fault.max_restarts", int, "restarts within --restart-window-s"),
    "--restart-window-s": ("fault.within_s", float, "restart intensity window"),
}


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face checkpoint directory")
    p.add_argument("--config", help="eaas.yaml with an EngineConfig tree")
    for flag, (_, typ, help_) in _FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="row results independent of batching (default on)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="no CUDA graphs: run every step eagerly (default off)")
    from eaas.cli_transport import add_transport_flags

    add_transport_flags(p)


def engine_config(args: argparse.Namespace) -> Any:
    """The EngineConfig of the flags over --config over the defaults. ConfigError of a field
    that a flag sets names that flag first."""
    from eaas.cli_transport import check_tls_files, flag_of_field, transport_overrides
    from eaas.config import EngineConfig
    from eaas.errors import ConfigError

    overrides = {dotted: getattr(args, flag[2:].replace("-", "_"))
                 for flag, (dotted, _, _) in _FLAGS.items()}
    overrides.update(transport_overrides(args))
    overrides["batch_invariant"] = args.batch_invariant
    overrides["enforce_eager"] = args.enforce_eager
    overrides["model"] = args.model
    try:
        if args.config:
            cfg = EngineConfig.from_yaml_file(args.config, **overrides)
        else:
            cfg = EngineConfig.from_dict({k: v for k, v in _nest(overrides).items()})
    except ConfigError as e:
        field = str(e).split("=", 1)[0]
        flag = flag_of_field(field) or next(
            (f for f, (dotted, _, _) in _FLAGS.items() if dotted == field), None)
        if flag is None or (overrides.get(field) is None and "=None " not in str(e)):
            raise  # a bad value from --config, not a flag's: the message names its field
        raise ConfigError(f"{flag}: {e}") from None
    t = cfg.transport
    check_tls_files(t.tls_cert, t.tls_key, t.tls_ca)
    return cfg


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    from eaas.config import merge_overrides

    return merge_overrides({}, flat)


def _read_token(path: str | None) -> str | None:
    """The admin token from --admin-token-file (first line, stripped), or None."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise SystemExit(f"eaas serve: cannot read --admin-token-file {path}: {e.strerror}")
    if not token:
        raise SystemExit(f"eaas serve: --admin-token-file {path} is empty")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eaas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help="serve a checkpoint over OpenAI-compatible HTTP + /admin")
    _add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-token-file", default=None, metavar="PATH",
                   help="file holding the bearer token for mutating admin routes (default: "
                   "$EAAS_ADMIN_TOKEN, else generated and printed); never pass the token itself "
                   "on the command line, where `ps` shows it")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="key that /v1 routes require as 'Authorization: Bearer KEY' (default: "
                   "$EAAS_API_KEY, else /v1 is open); prefer the variable: `ps` shows flags")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="no access-log line per request")
    p.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("generate", help="generate text for one prompt")
    _add_engine_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--sample-seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the output as JSON")

    p = sub.add_parser("make-tiny", help="write a tiny random-weight HF checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="qwen3_moe",
                   help="qwen3_moe | qwen2_moe | mixtral | deepseek_v3")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("config", help="print the resolved EngineConfig as YAML")
    _add_engine_flags(p)

    p = sub.add_parser("bench", help="measure generation throughput of a checkpoint")
    _add_engine_flags(p)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)

    p = sub.add_parser("status", help="show a running server's health, servers and counters")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--json", action="store_true", help="print the raw topology JSON")

    from eaas.cli_cluster import add_cluster_commands

    add_cluster_commands(sub)  # expert-server --join, rollout

    parser.description = ("The `eaas` command: " + ", ".join(sub.choices)
                          + " (`eaas COMMAND --help` for its flags).")
    from eaas.cli_transport import EPILOG

    parser.epilog = EPILOG
    args = parser.parse_args(argv)
    from eaas.errors import EaasError

    try:
        return _run(args)
    except EaasError as e:
        print(f"eaas {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "status":
        return _status(args.url, args.json)
    if args.cmd in ("expert-server", "rollout"):
        from eaas.cli_cluster import run_cluster_command

        return run_cluster_command(args)
    if args.cmd == "make-tiny":
        from eaas.model import make_tiny

        path = make_tiny(args.out_dir, args.arch, seed=args.seed)
        print(f"wrote a tiny {args.arch} checkpoint to {path or args.out_dir}")
        return 0
    cfg = engine_config(args)
    if args.cmd == "config":
        from eaas.model import Checkpoint

        Checkpoint.open(cfg.model, cfg.load_format)  # a missing checkpoint fails as in serve
        print(cfg.to_yaml(), end="")
        return 0
    if args.cmd == "serve":
        from eaas.serving.server import serve

        asyncio.run(serve(cfg, host=args.host, port=args.port,
                          admin_token=_read_token(args.admin_token_file),
                          ready_file=args.ready_file, api_key=args.api_key,
                          log_requests=not args.disable_log_requests))
        if cfg.placement.transport == "nvshmem":  # NVSHMEM's finalize at exit is collective:
            sys.stdout.flush()  # with a server killed earlier it would wait forever
            sys.stderr.flush()
            os._exit(0)
        return 0
    if args.cmd == "bench":
        return asyncio.run(_bench(cfg, args.num_prompts, args.max_tokens, args.prompt_len))
    if args.cmd == "generate":
        from eaas import Engine, SamplingParams

        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed)
        with Engine(cfg) as engine:
            out = engine.generate(args.prompt, params)[0]
        if args.json:
            print(json.dumps({"text": out.outputs[0].text, "token_ids": out.outputs[0].token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(out.outputs[0].text)
        return 0
    raise AssertionError(args.cmd)


async def _bench(cfg: Any, num_prompts: int, max_tokens: int, prompt_len: int) -> int:
    """Closed-loop throughput: num_prompts concurrent greedy requests of max_tokens each."""
    import time

    from eaas import AsyncEngine, SamplingParams

    if min(num_prompts, max_tokens, prompt_len) < 1:
        raise SystemExit("eaas bench: --num-prompts, --max-tokens and --prompt-len must be >= 1")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    async with AsyncEngine(cfg) as engine:
        vocab = engine.model_config.vocab_size
        prompts = [[(7 * i + 3 * j) % vocab for j in range(prompt_len)] for i in range(num_prompts)]

        async def one(p: list[int]) -> Any:
            async for out in engine.generate(p, params):
                pass
            return out

        await one(prompts[0][:2])  # warm-up
        before = await engine.stats()
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        after = await engine.stats()
    calls = sum(after[n].get("calls", 0) - before.get(n, {}).get("calls", 0)
                for n in after if n.startswith("expert-"))
    rows = sum(after[n].get("rows", 0) - before.get(n, {}).get("rows", 0)
               for n in after if n.startswith("expert-"))
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{num_prompts} requests x {max_tokens} tokens in {wall:.2f} s: "
          f"{tokens / wall:.1f} tokens/s; mean expert batch {rows / max(1, calls):.1f} rows "
          f"({calls} expert calls); server_mode={cfg.placement.server_mode}, "
          f"batch_invariant={cfg.batch_invariant}")
    return 0


def _status(url: str, raw: bool) -> int:
    """Read /health and /admin/api/topology of a running `eaas serve`."""
    import urllib.error
    import urllib.request

    def get(path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url.rstrip("/") + path, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    try:
        health_code, _ = get("/health")
        _, topo = get("/admin/api/topology")
    except (urllib.error.URLError, OSError) as e:
        print(f"eaas status: no eaas server at {url} ({e})", file=sys.stderr)
        return 2
    if raw:
        print(json.dumps(topo, indent=2))
        return 0 if health_code == 200 else 1
    print(f"{url}: {'healthy' if health_code == 200 else f'UNHEALTHY ({health_code})'}")
    for s in topo.get("servers", []):
        experts = sum(len(v) for v in (s.get("experts") or {}).values())
        print(f"  {s.get('name'):<12} {str(s.get('state')):<10} pid={s.get('pid')} "
              f"restarts={s.get('restarts')} experts={experts} {s.get('transport', '')}")
    routing = topo.get("routing") or {}
    print(f"  routing generation {routing.get('generation')}, dead {routing.get('dead') or []}")
    counters = topo.get("counters") or {}
    keys = ("requests_finished", "tokens_generated", "restarts", "reroutes", "resent_units",
            "degraded_requests")
    print("  " + ", ".join(f"{k}={counters.get(k, 0)}" for k in keys))
    return 0 if health_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
