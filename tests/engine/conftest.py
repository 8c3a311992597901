"""Tiny checkpoints (one per architecture, made once per session) and a reference oracle."""

from __future__ import annotations

import pytest
import torch

from eaas.model import ARCHS, Checkpoint, DecoderModel, make_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(make_tiny(root / arch, arch, seed=7)) for arch in ARCHS}


@pytest.fixture(scope="session")
def reference_greedy():
    """(model_dir, prompt ids, n) -> greedy ids from the monolithic pure-torch reference."""
    models: dict[str, DecoderModel] = {}

    def run(model_dir: str, prompt: list[int], n: int) -> list[int]:
        if model_dir not in models:
            models[model_dir] = DecoderModel.load(Checkpoint.open(model_dir), torch.float32,
                                                    batch_invariant=True)
        return models[model_dir].generate_greedy(prompt, n)

    return run


async def final(engine, prompt, params, **kw):
    """Run one request to the end; returns its last (finished) RequestOutput."""
    out = None
    async for out in engine.generate(prompt, params, **kw):
        pass
    return out


def prompts_of(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of mixed lengths (1..24 tokens) from real text."""
    text = ("Experts are stateless services; attention shards call them asynchronously. "
            "The quick brown fox jumps over the lazy dog. Hello, world! 0 1 2 3 4 5 6 7 8 9")
    ids = tokenizer.encode(text)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 1 + int(torch.randint(0, 24, (1,), generator=g))
        start = int(torch.randint(0, max(1, len(ids) - length), (1,), generator=g))
        out.append(ids[start:start + length])
    return out
