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
