"""The `eaas` commands for expert servers as services: `expert-server --join` and `rollout`.

    eaas expert-server --join http://engine:8000 --token-file F [--device cuda:0]
                       [--listen 10.0.0.7:0] [--name gpu-7] [--transport tcp] [--model PATH]
                       [--cluster-secret-file PATH] [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]
    eaas rollout http://engine:8000 --token-file F [--model PATH] [--servers a,b]

The admin token comes from --token, --token-file or EAAS_ADMIN_TOKEN (a token on the command
line is visible to `ps`: prefer the file or the environment).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_cluster_commands", "run_cluster_command"]


def add_cluster_commands(sub: Any) -> None:
    p = sub.add_parser("expert-server", help="an expert server that joins a running engine")
    p.add_argument("--join", required=True, metavar="URL",
                   help="the engine's HTTP URL (its admin API), e.g. http://10.0.0.1:8000")
    _token_flags(p)
    p.add_argument("--device", default="cpu", help="cpu | cuda:N (default cpu)")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="where the transport listener binds (tcp); the engine connects there, "
                   "so across hosts give this host's address (default 127.0.0.1:0)")
    p.add_argument("--name", default=None,
                   help="server name (default: the engine picks one); a new process with the "
                   "name of a lost or live server takes its place once ready")
    p.add_argument("--transport", default="tcp", choices=("tcp", "shm", "cudaipc"),
                   help="tcp (any host) | shm, cudaipc (the engine's host only)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="the checkpoint as this host sees it (default: the engine's path)")
    p.add_argument("--engine-timeout-s", type=float, default=30.0,
                   help="exit (75) when the engine has not answered for this long")
    from eaas.cli_transport import add_transport_flags

    add_transport_flags(p, join=True)

    p = sub.add_parser("rollout", help="rolling upgrade: replace every expert server, one at "
                       "a time, while serving")
    p.add_argument("url", help="the engine's HTTP URL")
    _token_flags(p)
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a new checkpoint (same shape) for the replacements")
    p.add_argument("--servers", default=None,
                   help="comma-separated server names (default: every server)")


def _token_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None, help="the admin token (visible to `ps`; prefer "
                   "--token-file or EAAS_ADMIN_TOKEN)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="file holding the admin token")


def _token(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"eaas {args.cmd}: cannot read --token-file {args.token_file}: "
                             f"{e.strerror}")
        if token:
            return token
        raise SystemExit(f"eaas {args.cmd}: --token-file {args.token_file} is empty")
    token = os.environ.get("EAAS_ADMIN_TOKEN")
    if not token:
        raise SystemExit(f"eaas {args.cmd}: the admin token is needed: --token-file PATH, "
                         "--token T or EAAS_ADMIN_TOKEN")
    return token


def run_cluster_command(args: argparse.Namespace) -> int:
    if args.cmd == "expert-server":
        from eaas.cli_transport import check_tls_files
        from eaas.engine.joiner import JoinOptions, run_joined_server

        check_tls_files(args.tls_cert, args.tls_key, args.tls_ca)
        opts = JoinOptions(url=args.join, token=_token(args), device=args.device,
                           listen=args.listen, name=args.name, transport=args.transport,
                           model=args.model, engine_timeout_s=args.engine_timeout_s,
                           secret_file=args.cluster_secret_file, tls_cert=args.tls_cert,
                           tls_key=args.tls_key, tls_ca=args.tls_ca,
                           argv=tuple(sys.argv[1:]))
        return asyncio.run(run_joined_server(opts))
    if args.cmd == "rollout":
        return _rollout(args.url, _token(args), args.model,
                        args.servers.split(",") if args.servers else None)
    raise AssertionError(args.cmd)


def _rollout(url: str, token: str, model: str | None, names: list[str] | None) -> int:
    """Replace each server in turn (POST /admin/api/servers/NAME/replace waits until the
    replacement is routed and the old one drained); stop at the first failure."""
    import urllib.error
    import urllib.request

    base = url.rstrip("/")

    def call(method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        req = urllib.request.Request(base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    try:
        topo = call("GET", "/admin/api/topology")
    except (urllib.error.URLError, OSError) as e:
        print(f"eaas rollout: no eaas server at {url} ({e})", file=sys.stderr)
        return 2
    servers = [s["name"] for s in topo.get("servers", []) if s.get("state") != "dead"]
    if names is not None:
        unknown = sorted(set(names) - set(servers))
        if unknown:
            print(f"eaas rollout: no live servers named {unknown}; servers: {servers}",
                  file=sys.stderr)
            return 2
        servers = [n for n in servers if n in names]
    print(f"eaas rollout: {len(servers)} servers, one at a time"
          + (f", to {model}" if model else ""))
    for name in servers:
        t0 = time.monotonic()
        try:
            reply = call("POST", f"/admin/api/servers/{name}/replace",
                         {"model": model} if model else {}, timeout=600.0)
        except urllib.error.HTTPError as e:
            detail = json.loads(e.read() or b"{}").get("error", {}).get("message", "")
            print(f"  {name}: FAILED ({e.code}: {detail}); stopping", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError) as e:
            print(f"  {name}: FAILED ({e}); stopping", file=sys.stderr)
            return 1
        print(f"  {name} -> {reply['server']} ({time.monotonic() - t0:.1f} s)", flush=True)
    print("eaas rollout: done")
    return 0
