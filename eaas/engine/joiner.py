"""`eaas expert-server --join URL`: an expert server started by hand, a job scheduler or a
container runtime, that joins a running engine over its admin API.

    1. POST /admin/api/join            -> a ticket: name, incarnation, experts to load, model,
                                          dtype, the cluster secret
    2. load only those experts, set EAAS_CLUSTER_SECRET, open the transport listener
       (the same server code as the engine's own server processes: server_main._serve)
    3. POST /admin/api/join/NAME/ready -> the engine connects, pings, routes to it
    4. serve; poll GET /admin/api/join/NAME?incarnation=N: exit when the engine no longer wants
       this process (removed: 0; superseded by a newer process of the name: 0; lost — routed
       around after missed heartbeats: 75, so a restarting supervisor brings it back, and it
       rejoins by name); start a successor when a rolling upgrade asks for one
    5. SIGTERM / SIGINT: POST /admin/api/join/NAME/leave (the engine takes it out of routing
       and drains it), then stop listening and exit 0

Every call carries `Authorization: Bearer <admin token>`. The engine unreachable for
`engine_timeout_s` in a row: exit 75.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["JoinOptions", "run_joined_server", "EXIT_LOST"]

log = logging.getLogger("eaas.joiner")

EXIT_LOST = 75  # EX_TEMPFAIL: the engine dropped this process, or cannot be reached


@dataclass(frozen=True, slots=True)
class JoinOptions:
    """What `eaas expert-server --join` was told (the CLI builds it)."""

    url: str  # the engine's HTTP base URL (its admin API)
    token: str  # the admin bearer token
    device: str = "cpu"
    listen: str = "127.0.0.1:0"  # HOST:PORT of the transport listener (tcp)
    name: str | None = None
    transport: str = "tcp"  # tcp | shm | cudaipc
    model: str | None = None  # the checkpoint path here (default: the engine's path)
    engine_timeout_s: float = 30.0
    secret_file: str | None = None  # the cluster secret held here (the engine's must equal it)
    tls_cert: str | None = None  # this host's paths of the cluster's TLS files (default: the
    tls_key: str | None = None  # engine's paths, from the ticket)
    tls_ca: str | None = None
    argv: tuple[str, ...] = ()  # this process's own `eaas` arguments (to start a successor)

    def listen_url(self) -> str:
        if self.transport == "tcp":
            return f"tcp://{self.listen}"
        return f"{self.transport}://"  # same-host transports: a fresh socket path


class AdminClient:
    """JSON calls to the engine's admin API with the bearer token."""

    def __init__(self, base: str, token: str) -> None:
        import aiohttp

        self.base = base.rstrip("/")
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def call(self, method: str, path: str, body: Any = None, *,
                   timeout: float = 30.0) -> Any:
        import aiohttp

        async with self._session.request(method, self.base + path, json=body,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            data = await r.json(content_type=None)
            if r.status >= 400:
                err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
                raise JoinRefused(r.status, err.get("message") or str(data))
            return data

    async def aclose(self) -> None:
        await self._session.close()


class JoinRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the engine answered {status}: {message}")
        self.status = status


async def run_joined_server(opts: JoinOptions) -> int:
    """Join, serve, leave (see the module docstring); returns the exit status."""
    from eaas.engine import server_main

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    admin = AdminClient(opts.url, opts.token)
    exit_code = 0
    try:
        ticket = await admin.call("POST", "/admin/api/join", {
            "name": opts.name, "device": opts.device, "transport": opts.transport,
            "host": socket.gethostname()})
        name, incarnation = ticket["name"], int(ticket["incarnation"])
        _say(f"eaas expert-server: joining {opts.url} as {name} (incarnation {incarnation}); "
             f"loading {sum(map(len, ticket['assignment'].values()))} experts")
        _adopt_transport_env(ticket, opts)
        model = opts.model or ticket["model"]
        args = server_main.parse_args([
            "--model", model, "--assignment", json.dumps(ticket["assignment"]),
            "--dtype", ticket["dtype"], "--device", opts.device,
            "--load-format", ticket["load_format"],
            "--batch-invariant" if ticket["batch_invariant"] else "--no-batch-invariant",
            "--listen", opts.listen_url()])
        interval = float(ticket.get("status_interval_s", 0.5))
        _init_torch(opts.device)

        async def on_listening(info: dict) -> None:
            reply = await admin.call("POST", f"/admin/api/join/{name}/ready", {
                "incarnation": incarnation, "url": info["url"], "pid": os.getpid()},
                timeout=120.0)
            _say(f"eaas expert-server: {name} listens on {info['url']}, in routing (generation "
                 f"{reply.get('generation')})")

        async def until() -> None:
            nonlocal exit_code
            exit_code = await _serve_until_done(admin, opts, name, incarnation, interval, stop,
                                                model)

        await server_main._serve(args, on_listening=on_listening, until=until)
    except JoinRefused as e:
        _say(f"eaas expert-server: {e}")
        return 2
    except (OSError, TimeoutError) as e:  # aiohttp's connection errors are OSErrors
        _say(f"eaas expert-server: cannot reach the engine at {opts.url}: "
             f"{type(e).__name__}: {e}")
        return EXIT_LOST
    finally:
        await admin.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return exit_code


async def _serve_until_done(admin: AdminClient, opts: JoinOptions, name: str, incarnation: int,
                            interval: float, stop: asyncio.Event, model: str) -> int:
    """Serve until SIGTERM (then leave: drained by the engine) or the engine lets us go."""
    loop = asyncio.get_running_loop()
    last_ok = loop.time()
    successor: subprocess.Popen | None = None
    while True:
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
        if stop.is_set():
            _say(f"eaas expert-server: {name} leaving (draining)")
            try:
                await admin.call("POST", f"/admin/api/join/{name}/leave",
                                 {"incarnation": incarnation}, timeout=60.0)
            except Exception as e:  # the engine is gone or refuses: leave anyway
                _say(f"eaas expert-server: {name}: leave was not confirmed ({e})")
            return 0
        try:
            st = await admin.call("GET", f"/admin/api/join/{name}?incarnation={incarnation}",
                                  timeout=max(2.0, interval * 4))
            last_ok = loop.time()
        except JoinRefused as e:
            if e.status in (401, 403):
                _say(f"eaas expert-server: {name}: {e}")
                return 2
            st = None
        except Exception:
            st = None
        if st is None:
            if loop.time() - last_ok > opts.engine_timeout_s:
                _say(f"eaas expert-server: {name}: the engine at {opts.url} has not answered "
                     f"for {opts.engine_timeout_s:.0f}s; exiting")
                return EXIT_LOST
            continue
        if not st.get("current"):
            reason = st.get("reason") or st.get("state")
            _say(f"eaas expert-server: {name} (incarnation {incarnation}) exits: {reason}")
            return EXIT_LOST if str(reason).startswith("lost") else 0
        roll = st.get("roll")
        if roll is not None and successor is None:
            successor = _start_successor(opts, name, roll.get("model") or model)
            _say(f"eaas expert-server: {name}: rolling upgrade, successor pid {successor.pid}")


def _start_successor(opts: JoinOptions, name: str, model: str) -> subprocess.Popen:
    """The same `eaas expert-server` command (code on disk now), named `name`, on `model`; it
    takes this process's place when ready. The token travels in its environment."""
    argv = [a for a in opts.argv]
    for flag in ("--name", "--model", "--token"):  # drop, then set ours
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    argv = [sys.executable, "-m", "eaas.cli", *argv, "--name", name, "--model", model]
    env = {**os.environ, "EAAS_ADMIN_TOKEN": opts.token}
    env.pop("EAAS_CLUSTER_SECRET", None)  # it gets its own from the engine
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def _adopt_transport_env(ticket: dict, opts: JoinOptions) -> None:
    """Before the listener opens (the transport layer reads these when it does): the cluster
    secret, and the engine's transport settings, TLS paths replaced by this host's if given
    (--tls-cert/--tls-key/--tls-ca). With --cluster-secret-file the secret is the file's, and
    the engine's must be the same. JoinRefused (as a 400) when they disagree."""
    import hmac

    from eaas.engine.join import CLUSTER_SECRET_ENV, SETTINGS_ENV

    offered = ticket.get("cluster_secret")
    if opts.secret_file is not None:
        from eaas.transport.auth import ensure_cluster_secret

        mine = ensure_cluster_secret(opts.secret_file)  # sets CLUSTER_SECRET_ENV
        if offered and not hmac.compare_digest(offered.strip().encode(), mine):
            raise JoinRefused(400, f"the engine's cluster secret is not the one in "
                              f"--cluster-secret-file {opts.secret_file}")
    elif offered:
        os.environ[CLUSTER_SECRET_ENV] = offered
    settings = dict(ticket.get("transport_settings") or {})
    if opts.tls_cert is not None:
        if not settings.get("tls_cert"):
            raise JoinRefused(400, "the engine does not run tcp:// over TLS (its "
                              "transport.tls_cert is unset): drop --tls-cert/--tls-key/--tls-ca")
        settings.update(tls_cert=opts.tls_cert, tls_key=opts.tls_key, tls_ca=opts.tls_ca)
    if settings:
        os.environ[SETTINGS_ENV] = json.dumps(settings, sort_keys=True)


def _init_torch(device: str) -> None:
    """As a spawned server process does (server_main.main): one intra-op thread (servers
    share the host's cores), and the device current."""
    import torch

    torch.set_num_threads(1)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
