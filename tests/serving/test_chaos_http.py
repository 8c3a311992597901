"""Chaos through `eaas serve` over HTTP with the default configuration (3 expert-server
processes x 2 replicas, batch-invariant, no_replica_policy wait): 48 greedy requests from 12
clients while server processes are SIGKILLed — two at once — and one is SIGSTOPped. Every request
completes with the fault-free tokens, and the server is ready again afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from eaas.model import Checkpoint, DecoderModel
from tests.serving.conftest import post_json, status_of

pytestmark = pytest.mark.slow

CLIENTS, PER_CLIENT, TOKENS = 12, 4, 12




def test_kills_and_a_hang_lose_no_request_and_change_no_token(tiny_dir, tmp_path):
    prompts = [[3 + (i * 7) % 300, 5 + i, 11, 2 + i % 5] for i in range(CLIENTS * PER_CLIENT)]
    model = DecoderModel.load(Checkpoint.open(tiny_dir), batch_invariant=True)
    want = [model.generate_greedy(p, TOKENS) for p in prompts]  # greedy, fault-free
    ready_file = tmp_path / "ready.json"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "eaas.cli", "serve", tiny_dir, "--port",
                                 "0", "--ready-file", str(ready_file)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = json.loads(ready_file.read_text())["url"]
        topo = json.loads(urllib.request.urlopen(url + "/admin/api/topology").read())
        pids = {s["name"]: s["pid"] for s in topo["servers"]}
        assert len(pids) == 3
        results: dict[int, tuple[int, dict]] = {}
        started = threading.Event()

        def client(c: int) -> None:
            for j in range(PER_CLIENT):
                i = c * PER_CLIENT + j
                started.set()
                results[i] = post_json(url + "/v1/completions", {
                    "prompt": prompts[i], "max_tokens": TOKENS, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True})

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        restarts: list[float] = []  # eaas_restarts_total as /metrics says it, over the run
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                try:
                    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
                    restarts.extend(float(line.split()[-1]) for line in text.splitlines()
                                    if line.startswith("eaas_restarts_total"))
                except OSError:
                    pass
                time.sleep(0.25)

        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.monotonic()
        for t in threads:
            t.start()
        started.wait(30)
        time.sleep(0.5)
        os.kill(pids["expert-0"], signal.SIGKILL)  # two down at once: some experts have no
        os.kill(pids["expert-1"], signal.SIGKILL)  # live replica until a restart
        time.sleep(2.5)
        os.kill(pids["expert-2"], signal.SIGSTOP)  # hung: the heartbeat replaces it
        time.sleep(3.0)
        try:
            os.kill(pids["expert-2"], signal.SIGCONT)
        except ProcessLookupError:
            pass
        for t in threads:
            t.join(180)
        took = time.monotonic() - t0
        done.set()
        poller.join(10)
        assert restarts and restarts == sorted(restarts), f"a counter went down: {restarts}"
        assert restarts[-1] >= 2
        bad = {i: r for i, r in results.items() if r[0] != 200}
        assert not bad, f"failed requests: {bad}\n{log.read_text()[-3000:]}"
        got = [results[i][1]["choices"][0]["token_ids"] for i in range(len(prompts))]
        assert got == want
        assert took < 150, f"48 requests took {took:.0f} s under faults"
        deadline = time.monotonic() + 60
        while status_of(url + "/ready") != 200:
            assert time.monotonic() < deadline, "not ready again after the faults"
            time.sleep(0.2)
        topo = json.loads(urllib.request.urlopen(url + "/admin/api/topology").read())
        assert topo["counters"]["restarts"] >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # servers failed during the run: their logs are kept, and the path is said
    text = log.read_text()
    kept = [line for line in text.splitlines() if "expert-server logs kept in" in line]
    assert kept, text[-2000:]
    run_dir = Path(kept[-1].split("kept in ", 1)[1].split(" (", 1)[0])
    assert run_dir.is_dir() and (run_dir / "expert-0.log").exists()
    shutil.rmtree(run_dir)
