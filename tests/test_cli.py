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


def test_admin_token_never_on_a_command_line_nor_in_a_childs_environment(tmp_path):
    """The token comes from --admin-token-file (or EAAS_ADMIN_TOKEN); neither `ps` of `eaas
    serve` nor an expert-server process's environment holds it, and mutating routes take it."""
    import urllib.request

    model = tmp_path / "m"
    assert run("make-tiny", str(model)).returncode == 0
    token = "file-admin-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    ready = tmp_path / "ready.json"
    server = subprocess.Popen([*EAAS, "serve", str(model), "--port", "0", "--ready-file",
                               str(ready), "--admin-token-file", str(tmp_path / "token"),
                               "--num-expert-servers", "2", "--expert-replicas", "1"],
                              env={**ENV, "EAAS_ADMIN_TOKEN": "env-token-should-not-leak-9"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        url = json.loads(ready.read_text())["url"]
        topo = json.loads(urllib.request.urlopen(f"{url}/admin/api/topology").read())
        pids = [s["pid"] for s in topo["servers"] if s.get("pid")]
        assert len(pids) == 2
        assert token not in Path(f"/proc/{server.pid}/cmdline").read_text()
        for pid in pids:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"EAAS_ADMIN_TOKEN" not in env and b"should-not-leak" not in env
        req = urllib.request.Request(f"{url}/admin/api/rebalance", method="POST", data=b"{}",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
        assert urllib.request.urlopen(req).status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    empty = tmp_path / "empty"
    empty.write_text("\n")
    bad = run("serve", str(model), "--admin-token-file", str(empty))
    assert bad.returncode != 0 and "is empty" in bad.stderr


def test_expert_server_and_rollout_flags_are_checked():
    out = run("expert-server", "--token", "t" * 16)
    assert out.returncode == 2 and "--join" in out.stderr
    env = {k: v for k, v in ENV.items() if k != "EAAS_ADMIN_TOKEN"}
    out = subprocess.run([*EAAS, "rollout", "http://127.0.0.1:9"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode != 0 and "the admin token is needed" in out.stderr
    out = run("rollout", "http://127.0.0.1:9", "--token", "t" * 16)  # nobody listens there
    assert out.returncode == 2 and "no eaas server at" in out.stderr
    out = run("expert-server", "--join", "http://127.0.0.1:9", "--token", "t" * 16,
              "--engine-timeout-s", "1")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
