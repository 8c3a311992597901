"""The `eaas` command as a user runs it: make-tiny, generate, bench, serve + status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EAAS = [sys.executable, "-m", "eaas.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*EAAS, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_make_tiny_generate_and_bench(tmp_path):
    model = tmp_path / "m"
    assert run("make-tiny", str(model), "--arch", "mixtral").returncode == 0
    out = run("generate", str(model), "--prompt", "Hello", "--max-tokens", "5", "--json",
              "--server-mode", "inproc")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["token_ids"]) == 5
    bench = run("bench", str(model), "--num-prompts", "4", "--max-tokens", "4",
                "--server-mode", "inproc")
    assert bench.returncode == 0 and "tokens/s" in bench.stdout, bench.stderr
    bad = run("generate", str(tmp_path / "missing"), "--prompt", "x")
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_status_reads_a_running_server(tmp_path):
    model = tmp_path / "m"
    assert run("make-tiny", str(model)).returncode == 0
    ready = tmp_path / "ready.json"
    server = subprocess.Popen([*EAAS, "serve", str(model), "--port", "0", "--server-mode",
                               "inproc", "--ready-file", str(ready)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        url = json.loads(Path(ready).read_text())["url"]
        status = run("status", "--url", url)
        assert status.returncode == 0, status.stderr
        assert "healthy" in status.stdout and "expert-2" in status.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    gone = run("status", "--url", url)
    assert gone.returncode == 2 and "no eaas server" in gone.stderr
