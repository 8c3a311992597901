"""The GPU benchmark harnesses run end to end on CPU (`--smoke`) and print complete tables:
every setup x batch_invariant mode x batch of bench_e2e_gpu, and bench_scale's three phases with
0 lost requests across 3 SIGKILLs and a 4 -> 3 -> 2 -> 4 server pool, plus its PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def _run(script: str, *args: str) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout, wall


def _table(text: str, first_header_cell: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose header starts with `first_header_cell`."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_bench_e2e_gpu_smoke_prints_every_row():
    out, wall = _run("bench_e2e_gpu.py")
    assert "# bench_e2e_gpu --smoke" in out and "peer in the same run: transformers" in out
    assert "decode tok/s (eaas) =" in out  # the formula is printed
    rows = _table(out, "setup")
    got = {(r[0], r[1], int(r[2])) for r in rows}
    eaas = ("eaas (smoke, CPU): server processes over tcp://",
            "eaas (smoke, CPU): in-process servers")
    want = {(s, inv, b) for s in eaas for inv in ("False", "True") for b in (1, 4, 8)}
    want |= {("transformers", "-", b) for b in (1, 4, 8)}
    assert got == want
    assert len(rows) == 15  # 2 eaas setups x 2 modes x 3 batches + 3 transformers rows
    for r in rows:
        assert "partial" not in r[3], f"a row hit the time budget: {r}"
        assert float(r[3]) > 0 and float(r[4]) > 0 and r[6] == "0", r
    print(f"bench_e2e_gpu --smoke took {wall:.1f} s")


def test_bench_decode_smoke_prints_every_path():
    out, wall = _run("bench_decode.py")
    assert "# bench_decode" in out and "# command:" in out
    rows = {r[0]: r[1:] for r in _table(out, "path")}
    labels = [l for l in rows if l.startswith("eaas co-located")]
    assert len(labels) == 2 and all("[dispatch]" in l for l in labels)  # CPU: no fast path
    for want in ("plain PyTorch step, one CUDA graph (eager_ms)", "transformers generate",
                 "weight-read floor", "fast / peer tok/s", "invariant / peer tok/s"):
        assert want in rows, want
    for label, cells in rows.items():
        assert all(c != "-" for c in cells), (label, cells)
    print(f"bench_decode --smoke took {wall:.1f} s")


def test_bench_scale_smoke_three_phases_no_lost_requests(tmp_path):
    out, wall = _run("bench_scale.py", "--out", str(tmp_path))
    rates = _table(out, "setup")
    assert {r[0].split(":")[0] for r in rates} == {"eaas (smoke, CPU)", "co-located (smoke, CPU)"}
    assert all(float(r[4]) > 0 and r[8] == "0" for r in rates), rates
    kills = _table(out, "kill")
    assert [k[1] for k in kills] == ["expert-0", "expert-1", "expert-2"]
    assert "requests lost: 0 (of " in out, "phase 2 lost requests"
    pool = _table(out, "expert servers")
    assert [int(p[0]) for p in pool] == [4, 3, 2, 4]
    assert all(float(p[4]) > 0 for p in pool), pool
    assert "pool phase requests lost: 0 (of " in out
    for png in ("scale_rates.png", "scale_kills.png", "scale_pool.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert (tmp_path / "scale_results.json").exists()
    print(f"bench_scale --smoke took {wall:.1f} s")


def test_bench_faults_smoke_loses_nothing(tmp_path):
    out, wall = _run("bench_faults.py", "--out", str(tmp_path))
    assert "# bench_faults --smoke" in out and "tok/s = tokens streamed in a" in out
    faults = _table(out, "setup")
    assert [(r[0], r[1].split()[0]) for r in faults] == [("replicas", "SIGKILL"),
                                                         ("replicas", "SIGSTOP")]
    for r in faults:  # detected, rerouted, restart begun, back in routing, first token
        assert all(c != "-" for c in r[3:8]), f"a phase time is missing: {r}"
        assert 0 <= float(r[3]) <= float(r[4]) <= float(r[6]), r
    summary = _table(out, "setup | engine start s")
    assert [(r[0], r[4], r[5]) for r in summary] == [("replicas", "0", "0")], summary
    assert "lost 0, mismatched 0" in out.split("soak ", 1)[1], "the soak lost requests"
    for png in ("faults_timeline.png", "faults_soak.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert (tmp_path / "faults_results.json").exists()
    print(f"bench_faults --smoke took {wall:.1f} s")
