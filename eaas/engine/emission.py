"""How a shard's new tokens become its requests' outputs: text, stop strings, log
probabilities, finishing, publishing.

A token is *taken* (`_take`: its id, logprob and times) and *settled* (`_settle`: grammar,
detokenized text, stop strings, then finish or publish), both by `_emit`. The co-located decode
step emits a step's tokens while the next step already runs on the GPU (async scheduling,
`AttentionShard._decode_step`), so this host work overlaps the GPU. `_token_end` is the part of
the end test that needs no text (`_settle` always finishes a request it names);
`_ends_by_count` is what the scheduler can tell before a step's token is on the host.

`TokenEmission` is a mixin of `AttentionShard` (eaas/engine/shard.py), which owns the requests,
the lanes and the KV blocks.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from eaas.engine.batch_sampling import position_logprobs, prompt_logprob_rows
from eaas.engine.logits import compute_logprobs
from eaas.engine.request import Request
from eaas.model.ops import upload

__all__ = ["TokenEmission"]


class TokenEmission:
    """_emit / _take / _settle / _finish, and the log probabilities of a step."""

    deps: Any
    model: Any
    tokenizer: Any
    by_id: dict[str, Request]
    _unforked: list[Any]
    _release: Any
    _admit: Any

    def _emit(self, r: Request, token: int, finite: bool,
              logprob: tuple[float, Any] | None = None) -> None:
        """Hand r its new token (with its (logprob, position entry) when computed) — or fail r
        alone: non-finite logits in its row, or an error of its own (decoding its text, a
        token its grammar refuses); the other requests of the step are not touched."""
        if not finite:
            self._finish(r, "error", error="the model produced non-finite logits (NaN or inf) "
                         "for this request")
            return
        try:
            self._append(r, token, logprob)
        except Exception as e:
            self._finish(r, "error", error=f"{type(e).__name__}: {e}")

    def _append(self, r: Request, token: int, logprob: tuple[float, Any] | None) -> None:
        self._take(r, token, logprob)
        self._settle(r)

    def _take(self, r: Request, token: int, logprob: tuple[float, Any] | None) -> None:
        """Record r's new token: all the next step needs (`_settle` does the rest)."""
        now = time.time()
        r.output_ids.append(token)
        if logprob is not None:
            r.cumulative_logprob += logprob[0]
            if r.logprobs is not None and logprob[1] is not None:
                r.logprobs.append(logprob[1])
        if r.metrics.first_token_time is None:
            r.metrics.first_token_time = now
        r.metrics.last_token_time = now
        self.deps.counters["tokens_generated"] = self.deps.counters.get("tokens_generated", 0) + 1

    @staticmethod
    def _full(r: Request, n: int) -> bool:
        """Whether n output tokens end r by their count: max_tokens, or the context length."""
        return n >= r.params.max_tokens or len(r.prompt_ids) + n >= r.max_len

    @classmethod
    def _token_end(cls, r: Request) -> str | None:
        """How r's last token ends it by itself ("stop": a stop id; "length": max_tokens or the
        context length), else None. `_settle` always finishes a request this names."""
        if not r.output_ids:
            return None
        if r.output_ids[-1] in r.stop_ids:
            return "stop"
        return "length" if cls._full(r, len(r.output_ids)) else None

    @classmethod
    def _ends_by_count(cls, r: Request, pending: bool) -> bool:
        """Whether r must not be stepped again: its last token ends it (`_token_end`), or — with
        a token still on its way from the step in flight (`pending`) — that token will be its
        max_tokens-th or fill its context. (Whether the pending token is a stop id or completes
        a stop string is known only once it lands.)"""
        if not pending:
            return cls._token_end(r) is not None
        return cls._full(r, len(r.output_ids) + 1)

    def _settle(self, r: Request) -> None:
        """After `_take`: r's grammar, text and stop strings, then finish or publish it."""
        p, token = r.params, r.output_ids[-1]
        if r.grammar is not None and not r.grammar.terminated and not r.grammar.accept(token):
            raise ValueError(f"token {token} does not follow the request's structured output "
                             "grammar")
        before = len(r.text)
        if r.detok is None:
            r.detok = self.tokenizer.stream()
        r.text += r.detok.step(token)
        hit = _find_stop(r.text, p.stop, before) \
            if p.stop and len(r.output_ids) >= p.min_tokens else None
        end = self._token_end(r)
        if end == "stop":
            # vLLM: None for the model's eos, the id for a stop_token_ids match
            r.stop_reason = None if token in r.eos_ids else token
            self._finish(r, "stop")
        elif hit is not None:
            at, stop = hit
            r.text = r.text[:at + len(stop)] if p.include_stop_str_in_output else r.text[:at]
            r.stop_reason = stop
            self._finish(r, "stop")
        elif r.grammar is not None and r.grammar.terminated:
            self._finish(r, "stop")  # the grammar is complete (its end is the eos token)
        elif end == "length":
            self._finish(r, "length")
        else:
            r.publish()

    def _finish(self, r: Request, reason: str, *, error: str | None = None) -> None:
        if r.finished:
            return
        r.finished, r.finish_reason, r.error = True, reason, error
        r.metrics.finished_time = time.time()
        self._release(r)  # free the KV blocks now (or when its step in flight ends)
        self.by_id.pop(r.request_id, None)
        g = r.group
        if g is not None and g.leader is r and not g.forked:
            for f in g.followers:  # never forked: they end with the leader, for its reason
                self._finish(f, reason if reason in ("abort", "error") else "abort",
                             error=error or "the request's first sequence ended before its "
                             "prompt was prefilled")
            if g in self._unforked:
                self._unforked.remove(g)
        if g is None or g.finished:
            key = "requests_" + {"stop": "finished", "length": "finished"}.get(reason, reason)
            self.deps.counters[key] = self.deps.counters.get(key, 0) + 1
        r.publish()
        self._admit()

    def _decode_token(self, token: int) -> str:
        try:
            return self.tokenizer.decode([token], skip_special_tokens=False)
        except Exception:
            return ""

    def _logprob_entries(self, srows: list[Request], tokens: dict[int, int],
                         lp: list[torch.Tensor]) -> dict[int, tuple[float, Any]]:
        """Per sampling row: (the sampled token's logprob, its position entry or None)."""
        chosen, rank, top_lp, top_ids = (t.tolist() for t in lp)
        out: dict[int, tuple[float, Any]] = {}
        for j, r in enumerate(srows):
            n = r.params.logprobs
            entry = None if n is None else position_logprobs(
                tokens[j], chosen[j], rank[j], top_lp[j], top_ids[j], n, self._decode_token)
            out[j] = (chosen[j], entry)
        return out

    def _prompt_logprobs(self, reqs: list[Request], chunks: list[list[int]],
                         rows: list[tuple[int, int]], h: torch.Tensor
                         ) -> tuple[list[tuple[Request, list[int]]], list[torch.Tensor]]:
        """This step's prompt logprobs: ([(request, the prompt tokens scored, in order)],
        device tensors of `compute_logprobs` over their rows); ([], []) when none asks."""
        asks = [(r, rows[b][0], r.num_computed, len(chunks[b])) for b, r in enumerate(reqs)
                if r.params.prompt_logprobs is not None and not r.prefilled and not r.finished]
        owners = []
        for r, row0, pos0, n in asks:
            _, targets = prompt_logprob_rows([(r, row0, pos0, n)])
            owners.append((r, targets))
        idx, targets = prompt_logprob_rows(asks)
        if not idx:
            return owners, []
        logits = self.model.lm_head(self.model.final_norm(h[upload(idx, h.device)]))  # [P, V]
        num_top = min(logits.shape[-1], max(r.params.prompt_logprobs for r, *_ in asks))
        return owners, list(compute_logprobs(logits, upload(targets, logits.device), num_top))

    def _store_prompt_logprobs(self, owners: list[tuple[Request, list[int]]],
                               lp: list[torch.Tensor]) -> None:
        chosen, rank, top_lp, top_ids = (t.tolist() for t in lp) if lp else ([],) * 4
        j = 0
        for r, targets in owners:
            if r.prompt_logprobs is None:
                r.prompt_logprobs = [None]  # the first prompt token has no prediction
            for t in targets:
                r.prompt_logprobs.append(position_logprobs(
                    t, chosen[j], rank[j], top_lp[j], top_ids[j], r.params.prompt_logprobs,
                    self._decode_token))
                j += 1


def _find_stop(text: str, stop: tuple[str, ...], before: int) -> tuple[int, str] | None:
    """The earliest stop string in `text` that ends past `before` (the text's length at the
    previous token), as (its start, the string)."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, max(0, before - len(s) - 3))  # a few chars back: decoding may change
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
