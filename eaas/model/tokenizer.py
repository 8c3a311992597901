"""Tokenizer: a thin wrapper over a `tokenizer.json` (the `tokenizers` package) plus chat
formatting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eaas.errors import CheckpointError

__all__ = ["Tokenizer", "TextStream"]


class Tokenizer:
    """Encode/decode with a Hugging Face `tokenizer.json`.

    `eos_token_ids` come from generation_config.json / config.json (the caller passes them);
    `apply_chat_template` renders tokenizer_config.json's Jinja template when there is one, else the
    simple default `"<|role|>\\ncontent\\n"` per message followed by `"<|assistant|>\\n"`.
    """

    def __init__(
        self, path: str | Path, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None
    ) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exception
            raise CheckpointError(f"{self.path}: cannot read tokenizer.json ({exc})") from None
        self.eos_token_ids: tuple[int, ...] = tuple(int(i) for i in eos_token_ids)
        self.bos_token_id = bos_token_id
        self._chat_template: str | None = None
        self._special: dict[str, Any] = {}
        cfg_path = self.path.parent / "tokenizer_config.json"
        if cfg_path.exists():
            try:
                tcfg = json.loads(cfg_path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{cfg_path}: cannot read ({exc})") from None
            template = tcfg.get("chat_template")
            self._chat_template = template if isinstance(template, str) else None
            self._special = {k: tcfg.get(k) for k in ("bos_token", "eos_token")}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens=True applies tokenizer.json's own post-processor
        (e.g. Mixtral's BOS; Qwen adds none), as transformers' fast tokenizers do; pass False for
        text that already holds its special tokens (a rendered chat template)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> TextStream:
        """An incremental decoder of one sequence's tokens (each token's new text in O(1))."""
        return TextStream(self._tok, skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render chat `messages` ([{"role": ..., "content": ...}]) into one prompt string."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if self._chat_template is not None:
            import jinja2

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(self._chat_template).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **{k: (v if isinstance(v, str) else "") for k, v in self._special.items()},
            )
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


class TextStream:
    """The text of a growing token sequence, one token at a time: `step(id)` returns the text
    that token adds ("" while it ends inside a multi-byte character, which a later token
    completes). The concatenated steps equal `Tokenizer.decode` of the whole sequence whenever
    that ends on a complete character. `tokenizers`' DecodeStream (the prefix-window method of
    vLLM and TGI): decoding the n-th token costs the same as the first, where decoding the whole
    output again per token costs O(n)."""

    __slots__ = ("_tok", "_stream")

    def __init__(self, tok: Any, skip_special_tokens: bool = True) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token: int) -> str:
        return self._stream.step(self._tok, int(token)) or ""
