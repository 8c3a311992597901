"""README.md stays true: its configuration block is a valid config showing the defaults."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from eaas import EngineConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def _config_block() -> str:
    text = README.read_text()
    section = text[text.index("## Configuration"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_readme_config_block_is_the_default_config():
    shown = yaml.safe_load(_config_block())
    cfg = EngineConfig.from_dict(shown)  # every field valid
    defaults = EngineConfig(model=shown["model"]).to_dict()

    def check(d: dict, want: dict, path: str) -> None:
        for k, v in d.items():
            assert k in want, f"README shows {path}{k}, which the config does not have"
            if isinstance(v, dict):
                check(v, want[k], f"{path}{k}.")
            else:
                assert v == want[k], f"README shows {path}{k}: {v!r}, the default is {want[k]!r}"

    check(shown, defaults, "")
    assert cfg.model == shown["model"]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_api_snippet_runs_as_written(tmp_path):
    """The Python API block is a whole script: run it on a tiny checkpoint at the path it names
    (`make run`'s `.tiny/qwen3_moe`, here under a temporary working directory)."""
    import os
    import subprocess
    import sys

    from eaas.model import make_tiny

    section = README.read_text()
    section = section[section.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '".tiny/qwen3_moe"' in code and "if __name__ == \"__main__\":" in code
    make_tiny(tmp_path / ".tiny" / "qwen3_moe", "qwen3_moe", seed=0)
    (tmp_path / "snippet.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(README.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stop" in run.stdout or "length" in run.stdout


def test_readme_gpu_snippet_is_valid_python():
    """The GPU data-plane block needs torchrun and GPUs (tests/gpu run it for real); here it
    must at least compile as written."""
    blocks = [b for b in _python_blocks() if "NvshmemPlane" in b]
    assert blocks
    for b in blocks:
        compile(b, "README.md", "exec")


async def test_readme_curl_body_is_accepted(tmp_path):
    """The quick start's curl request, sent as written to the app (its model name is the
    checkpoint directory's, qwen3_moe)."""
    import json

    from eaas.model import make_tiny
    from tests.serving.conftest import engine_config, serving_client

    m = re.search(r"curl -s localhost:8000(\S+) .*?-d '(.*?)'", README.read_text(), re.S)
    path, body = m.group(1), json.loads(m.group(2))
    model = make_tiny(tmp_path / "qwen3_moe", "qwen3_moe", seed=0)
    async with serving_client(engine_config(str(model))) as client:
        resp = await client.post(path, json=body)
        data = await resp.json()
    assert resp.status == 200, data
    assert data["usage"]["completion_tokens"] == body["max_tokens"] or \
        data["choices"][0]["finish_reason"] == "stop"
