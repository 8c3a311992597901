"""`eaas_kernels` imports from its folder and nothing of eaas shadows PyPI's `kernels`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "eaas_kernels"

PROBE = """
import importlib.util, json
import transformers
from transformers.utils import import_utils
cfg = transformers.AutoConfig.for_model("qwen3_moe", num_experts=4)
import eaas_kernels
spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "config": type(cfg).__name__,
    "eaas_kernels": eaas_kernels.__file__,
    "kernels": spec.origin if spec else None,
    "hf_kernels_available": import_utils.is_kernels_available(),
}))
"""


def test_transformers_imports_and_kernels_is_not_our_folder(tmp_path):
    # a fresh interpreter outside the checkout: what a user with eaas installed gets
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["config"] == "Qwen3MoeConfig"
    assert Path(seen["eaas_kernels"]).resolve().parent == KERNELS_DIR
    if seen["kernels"] is not None:  # PyPI's `kernels` installed: it must be that one
        assert not Path(seen["kernels"]).resolve().is_relative_to(KERNELS_DIR)
    else:
        assert seen["hf_kernels_available"] is False
