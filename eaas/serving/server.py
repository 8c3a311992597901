"""`serve()`: run an engine behind the HTTP app until SIGINT/SIGTERM, then shut down cleanly.

Order on start: HTTP socket (so /health and /ready answer while the model loads), engine,
then the URLs (and a generated admin token) are printed and `ready_file` is written.
Order on a signal: stop accepting connections, answer new requests 503, let in-flight ones
finish for `drain_grace_s`, abort the rest (their responses say why), end event streams,
stop the engine (it stops its servers in reverse start order), return (exit status 0).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from eaas.errors import ConfigError
from eaas.serving.app import create_app
from eaas.serving.guards import HttpTimeouts, server_kwargs

if TYPE_CHECKING:
    from eaas.config import EngineConfig

log = logging.getLogger("eaas.serving")

ADMIN_TOKEN_ENV = "EAAS_ADMIN_TOKEN"
API_KEY_ENV = "EAAS_API_KEY"


async def serve(config: EngineConfig, *, host: str = "127.0.0.1", port: int = 8000,
                admin_token: str | None = None, ready_file: str | None = None,
                drain_grace_s: float = 10.0, timeouts: HttpTimeouts | None = None,
                api_key: str | None = None, log_requests: bool = True) -> None:
    """Serve `config`'s model on http://host:port until SIGINT/SIGTERM; return after a clean stop.

    admin_token: bearer token of the mutating admin routes; None reads EAAS_ADMIN_TOKEN, and
      if that is unset too a random token is generated and printed.
    ready_file: once ready, this file is written (atomically) with a JSON object
      {"url", "host", "port", "pid"}; `port` is the bound one (useful with port=0).
    timeouts: connection deadlines (body 30 s, keep-alive/idle 75 s by default).
    api_key: the key `/v1` routes require (`Authorization: Bearer`); None reads EAAS_API_KEY,
      and if that is unset too `/v1` is open.
    log_requests: one access-log line per request on stderr (`access.py`); False for
      `--disable-log-requests`.
    """
    from eaas import AsyncEngine

    token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
    generated = token is None
    token = token or secrets.token_urlsafe(24)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    engine = AsyncEngine(config)
    app = create_app(engine, admin_token=token, model_name=config.model_name,
                     drain_grace_s=drain_grace_s, timeouts=timeouts, api_key=api_key,
                     log_requests=log_requests)
    handler = _access_handler() if log_requests else None
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=drain_grace_s + 10.0, **server_kwargs(app))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    engine_started = False
    runner_open = False
    try:
        await runner.setup()
        runner_open = True
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        bound = runner.addresses[0][1]
        url = f"http://{_url_host(host)}:{bound}"
        _say(f"eaas: loading {config.model_name!r} ({config.model}); {url}/ready says when ready")
        start = asyncio.ensure_future(engine.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        engine_started = True  # even half-started engines are closed below
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            stopped.cancel()
            return
        stopped.cancel()
        start.result()  # raise a start failure
        _say(_banner(url, config.model_name, token, generated))
        if ready_file:
            _write_ready_file(ready_file, {"url": url, "host": host, "port": bound,
                                           "pid": os.getpid()})
        await stop.wait()
        _say(f"eaas: shutting down (draining up to {drain_grace_s:.0f}s)")
    finally:
        if handler is not None:
            logging.getLogger("eaas.access").removeHandler(handler)
        for sig in signals:
            loop.remove_signal_handler(sig)
        if runner_open:
            await runner.cleanup()  # stop accepting, drain/abort in-flight, end SSE streams
        if engine_started:
            await engine.aclose()  # stops servers in reverse start order
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)
    _say("eaas: stopped")


def _access_handler() -> logging.Handler:
    """The access log on stderr (the logger has no handler of its own otherwise)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s eaas.access %(message)s"))
    logger = logging.getLogger("eaas.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _banner(url: str, model: str, token: str, generated: bool) -> str:
    lines = [
        f"eaas: serving {model!r}",
        f"  OpenAI API  {url}/v1",
        f"  admin       {url}/admin",
        f"  metrics     {url}/metrics",
        f"  health      {url}/health",
    ]
    if generated:
        lines.append(f"  admin token {token}  (generated; set {ADMIN_TOKEN_ENV} to choose one)")
    return "\n".join(lines)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _write_ready_file(path: str, info: dict[str, Any]) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, p)


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
