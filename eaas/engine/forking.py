"""n > 1 and best_of: the sequences of one request share its prompt's prefill.

The group's leader prefills the prompt; when the step that finishes it runs, each follower gets
a copy of the prompt's last, partial KV block (the full blocks before it are shared, reference
counted by `BlockAllocator.fork`), samples its first token from the leader's logits row, and
joins the least-loaded lane.

`SeqForking` is a mixin of `AttentionShard` (eaas/engine/shard.py).
"""

from __future__ import annotations

from typing import Any

from eaas.engine.request import Request
from eaas.model.ops import upload

__all__ = ["SeqForking"]


class SeqForking:
    """_forking / _copy_prompt_tail / _fork."""

    cache: Any
    device: str
    lanes: list[list[Request]]
    _wake: list[Any]
    _unforked: list[Any]
    _emit: Any

    def _forking(self, r: Request) -> bool:
        """r leads a group whose prompt is prefilled by this step: its followers fork now."""
        return r.group is not None and r.group.leader is r and not r.group.forked

    def _copy_prompt_tail(self, reqs: list[Request], emit: list[int]) -> None:
        """Copy the prompt's last, partial KV block of each forking leader into each follower's
        own block (the full blocks before it are shared; `BlockAllocator.fork`)."""
        bs = self.cache.block_size
        for b in emit:
            r = reqs[b]
            if not self._forking(r) or len(r.prompt_ids) % bs == 0 or r.blocks is None:
                continue
            i = len(r.prompt_ids) // bs
            dst = [f.blocks.block_ids[i] for f in r.group.followers
                   if not f.finished and f.blocks is not None]
            if not dst:
                continue
            idx = upload(dst, self.device)
            for t in (*self.cache.k, *self.cache.v):  # [num_blocks, block_size, ...] per layer
                src = t[r.blocks.block_ids[i]].clone()
                t.index_copy_(0, idx, src.expand(len(dst), *t.shape[1:]).contiguous())

    def _fork(self, leader: Request, rows: list[tuple[int, Request]], tokens: dict[int, int],
              entries: dict[int, tuple[float, Any]]) -> None:
        """Start the followers: their prompt is the leader's (in the KV cache), their first
        token sampled from its logits row; each joins the least-loaded lane."""
        group = leader.group
        assert group is not None
        group.forked = True
        if group in self._unforked:
            self._unforked.remove(group)
        for j, f in rows:
            f.num_computed = leader.num_computed
            f.metrics.first_scheduled_time = leader.metrics.first_scheduled_time
            self._emit(f, tokens[j], True, entries.get(j))
            if not f.finished:
                i = min(range(len(self.lanes)), key=lambda k: len(self.lanes[k]))
                self.lanes[i].append(f)
                self._wake[i].set()
