"""Expert servers as services, through the real commands: `eaas serve` with 1 local expert
server, and 2 `eaas expert-server --join` processes that join it over the admin API.

One served engine for the module; the tests run in order on it: joined servers serve the
reference tokens; a SIGKILLed joined server is routed around (no failed request) and a new
process with its name rejoins; SIGTERM drains one (no failed request, it exits 0); `eaas
rollout` replaces every server one at a time under load (no failed request, same tokens)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eaas.model import Checkpoint, DecoderModel
from tests.serving.conftest import post_json

pytestmark = pytest.mark.slow

TOKEN = "join-test-admin-token-0123"
TOKENS = 6
PROMPTS = [[3 + (i * 7) % 300, 5 + i, 11, 2 + i % 5] for i in range(8)]


def _get(url: str, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())



def wait_for(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


@dataclass
class Cluster:
    url: str
    serve: subprocess.Popen
    log: Path
    tmp: Path
    joiners: dict[str, subprocess.Popen] = field(default_factory=dict)
    want: list[list[int]] = field(default_factory=list)

    def servers(self) -> dict[str, dict]:
        return {s["name"]: s for s in _get(self.url + "/admin/api/topology")["servers"]}

    def routing(self) -> dict:
        return _get(self.url + "/admin/api/topology")["routing"]

    def join(self, name: str, *, token_file: bool = True) -> subprocess.Popen:
        auth = ["--token-file", str(self.tmp / "token")] if token_file else ["--token", TOKEN]
        log = open(self.tmp / f"join-{name}-{len(self.joiners)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "eaas.cli", "expert-server", "--join",
                                 self.url, *auth, "--name", name], stdout=log,
                                stderr=subprocess.STDOUT, env=_env())
        self.joiners[name] = proc
        wait_for(lambda: self.servers().get(name, {}).get("pid") == proc.pid
                 and self.servers()[name]["state"] == "alive"
                 and name not in self.routing()["dead"], f"{name} (pid {proc.pid}) routed")
        return proc

    def joined_log(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.tmp.glob("join-*.log")))


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("EAAS_CLUSTER_SECRET", None)
    env.pop("EAAS_ADMIN_TOKEN", None)
    return env


@pytest.fixture(scope="module")
def cluster(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("join")
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "eaas.yaml").write_text("placement: {num_expert_servers: 1, expert_replicas: 1}\n"
                                   "fault: {warm_spares: 0}\n")
    model = DecoderModel.load(Checkpoint.open(tiny_dir), batch_invariant=True)
    want = [model.generate_greedy(p, TOKENS) for p in PROMPTS]
    ready, log = tmp / "ready.json", tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "eaas.cli", "serve", tiny_dir,
                                 "--config", str(tmp / "eaas.yaml"), "--port", "0",
                                 "--ready-file", str(ready)], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**_env(), "EAAS_ADMIN_TOKEN": TOKEN})
    c = Cluster("", proc, log, tmp, want=want)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, "eaas serve", 120)
        assert proc.poll() is None, log.read_text()
        c.url = json.loads(ready.read_text())["url"]
        c.join("joined-a", token_file=True)
        c.join("joined-b", token_file=False)
        yield c
    finally:
        try:  # joined processes this test did not start itself (a rollout's successors)
            pids = [s["pid"] for s in c.servers().values() if s["origin"] == "join"]
        except Exception:
            pids = []
        for p in [*c.joiners.values()]:
            if p.poll() is None:
                p.terminate()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in c.joiners.values():
            p.wait(30)
        wait_for(lambda: not any(_alive(pid) for pid in pids), "joined processes to exit", 30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Load:
    """Clients posting greedy completions of PROMPTS in a loop until stopped."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url, self.results = url, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c,))
                         for c in range(clients)]

    def _client(self, c: int) -> None:
        i = c
        while not self._stop.is_set():
            k = i % len(PROMPTS)
            status, body = post_json(self.url + "/v1/completions", {
                "prompt": PROMPTS[k], "max_tokens": TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            self.results.append((k, status, body))
            i += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        wait_for(lambda: len(self.results) >= 2, "the first completions")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def check(self, want: list[list[int]], log: str) -> None:
        bad = [(k, s, b) for k, s, b in self.results if s != 200]
        assert not bad, f"{len(bad)} failed requests, first: {bad[0]}\n{log}"
        got = {k: b["choices"][0]["token_ids"] for k, _, b in self.results}
        assert all(got[k] == want[k] for k in got), "tokens differ from the reference"


def test_joined_servers_serve_the_reference_tokens(cluster: Cluster) -> None:
    servers = cluster.servers()
    assert {n: s["origin"] for n, s in servers.items()} == {
        "expert-0": "local", "joined-a": "join", "joined-b": "join"}
    table = cluster.routing()["table"]
    assert all(set(srv) == set(servers) for ex in table.values() for srv in ex.values())
    for k, prompt in enumerate(PROMPTS[:4]):
        status, body = post_json(cluster.url + "/v1/completions", {
            "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == cluster.want[k]


def test_a_killed_joined_server_is_routed_around_and_rejoins(cluster: Cluster) -> None:
    victim = cluster.joiners["joined-a"]
    with Load(cluster.url) as load:
        victim.kill()
        wait_for(lambda: "joined-a" in cluster.routing()["dead"], "joined-a out of routing")
        n = len(load.results)
        wait_for(lambda: len(load.results) >= n + 3, "completions without joined-a")
        cluster.join("joined-a")  # a new process with the same name takes its place
        n = len(load.results)
        wait_for(lambda: len(load.results) >= n + 2, "completions after the rejoin")
    load.check(cluster.want, cluster.joined_log())
    assert cluster.servers()["joined-a"]["restarts"] >= 1


def test_sigterm_drains_a_joined_server_with_no_failed_request(cluster: Cluster) -> None:
    proc = cluster.joiners["joined-b"]
    with Load(cluster.url) as load:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, cluster.joined_log()
        assert "joined-b" not in cluster.servers()  # drained and removed before it exited
        n = len(load.results)
        wait_for(lambda: len(load.results) >= n + 2, "completions after the drain")
    load.check(cluster.want, cluster.joined_log())


def test_rollout_of_every_server_under_load_fails_no_request(cluster: Cluster) -> None:
    before = cluster.servers()
    with Load(cluster.url) as load:
        out = subprocess.run([sys.executable, "-m", "eaas.cli", "rollout", cluster.url,
                              "--token-file", str(cluster.tmp / "token")],
                             capture_output=True, text=True, timeout=240, env=_env())
        assert out.returncode == 0, out.stdout + out.stderr
        n = len(load.results)
        wait_for(lambda: len(load.results) >= n + 2, "completions after the rollout")
    load.check(cluster.want, cluster.joined_log())
    after = cluster.servers()
    assert "expert-0" not in after and len(after) == len(before)  # replaced under a new name
    # the joined server rolled itself: a successor process took over under the same name
    assert after["joined-a"]["pid"] != before["joined-a"]["pid"]
    assert not cluster.routing()["dead"]
