"""Log probabilities in the OpenAI shapes vLLM returns.

Engine entries are, per position, {token id: Logprob} with the chosen token first, then the
top N alternatives (`eaas.engine.outputs`). Completions want
`{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`; chat wants
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
A prompt position without a prediction (the first token) is None in both lists (completions
with echo).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["chat_logprobs", "completion_logprobs"]


def _token(lp: Any, token_id: int) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def completion_logprobs(entries: Sequence[dict | None], num_top: int, text_offset: int = 0,
                        prompt_ids: Sequence[int] = (), decode: Any = None) -> dict:
    """The completions `logprobs` object of consecutive positions starting at `text_offset`.

    entries: per position {token id: Logprob} (chosen first), or None for a prompt position
    without a prediction, in which case its token comes from prompt_ids and `decode`.
    """
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    pos = text_offset
    for k, e in enumerate(entries):
        if e is None:
            tok = decode(prompt_ids[k]) if decode is not None else ""
            tokens.append(tok)
            token_lps.append(None)
            tops.append(None)
        else:
            chosen_id, chosen = next(iter(e.items()))
            tok = _token(chosen, chosen_id)
            tokens.append(tok)
            token_lps.append(chosen.logprob)
            top = {_token(lp, t): lp.logprob for t, lp in e.items()
                   if t == chosen_id or (lp.rank is not None and lp.rank <= num_top)}
            tops.append(top)
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_item(token_id: int, lp: Any) -> dict:
    tok = _token(lp, token_id)
    return {"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode("utf-8"))}


def chat_logprobs(entries: Sequence[dict], num_top: int) -> dict:
    """The chat `logprobs` object: per generated token, itself and its top `num_top`."""
    content = []
    for e in entries:
        chosen_id, chosen = next(iter(e.items()))
        item = _chat_item(chosen_id, chosen)
        ranked = sorted(((lp.rank, t, lp) for t, lp in e.items()
                         if lp.rank is not None and lp.rank <= num_top), key=lambda x: x[0])
        item["top_logprobs"] = [_chat_item(t, lp) for _, t, lp in ranked[:num_top]]
        content.append(item)
    return {"content": content}
