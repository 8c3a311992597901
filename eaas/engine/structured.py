"""Structured output through xgrammar: compile a request's grammar, keep one matcher per sequence.

Why xgrammar (not outlines-core): it is vLLM's and SGLang's default backend and actively
maintained; it compiles a JSON schema in milliseconds into a pushdown automaton with a cached
per-state token mask (outlines-core turns the schema into a regular expression and a token DFA
whose index is built over the whole vocabulary per schema, and cannot express recursive
schemas); and its matcher fills the next-token bitmask in C++ without the GIL-heavy Python
loops. The masks it fills are applied on the logits' device by
`eaas.engine.logits.apply_token_bitmask` (pure torch, batched).

xgrammar is imported on first use only (it takes seconds and pulls transformers): a server that
never sees a grammar never imports it. It is in the `serve` and `test` extras.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from eaas.engine.params import StructuredOutputsParams
from eaas.errors import RequestError

__all__ = ["GrammarCompiler", "Matcher"]


class Matcher:
    """The grammar state of one sequence: which tokens may come next, and feeding it tokens."""

    __slots__ = ("_m",)

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed next tokens into row `row` of an int32 [B, W] mask."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by `token`; False if the grammar does not allow it (the state is unchanged)."""
        return bool(self._m.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        """The grammar is complete (its stop token was accepted): the sequence ends."""
        return bool(self._m.is_terminated())


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` for one tokenizer (cached by xgrammar per grammar).

    tokenizer: an `eaas.model.Tokenizer` (its `tokenizers` vocabulary is read once);
    vocab_size: the model's logits width (may exceed the tokenizer's); stop_token_ids: the
    ids that end a complete grammar (the model's eos ids).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop = [int(t) for t in stop_token_ids]
        self._compiler: Any = None

    def _xgr(self) -> Any:
        try:
            import xgrammar
        except ImportError:
            raise RequestError("structured output (response_format, structured_outputs, tools "
                               "with tool_choice 'required' or a named function) needs the "
                               "xgrammar package: pip install 'eaas[serve]'") from None
        return xgrammar

    def _get(self) -> Any:
        if self._compiler is None:
            xgr = self._xgr()
            hf = self._tokenizer._tok  # the `tokenizers.Tokenizer`
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(hf.to_str())
            vocab = hf.get_vocab(with_added_tokens=True)
            encoded = [""] * max(len(vocab), max(vocab.values(), default=-1) + 1)
            for text, i in vocab.items():
                encoded[i] = text
            info = xgr.TokenizerInfo(encoded, vocab_type=meta["vocab_type"],
                                     vocab_size=self.vocab_size, stop_token_ids=self._stop,
                                     add_prefix_space=meta["add_prefix_space"])
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec`; RequestError (400) naming what does not compile."""
        compiler = self._get()
        try:
            if spec.json is not None:
                return compiler.compile_json_schema(spec.json, any_whitespace=False)
            if spec.json_object:
                return compiler.compile_builtin_json_grammar()
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                alts = " | ".join(json.dumps(c) for c in spec.choice)
                return compiler.compile_grammar(f"root ::= {alts}")
            return compiler.compile_grammar(spec.grammar)
        except RuntimeError as e:  # xgrammar's parse/compile errors
            kind = next(k for k in ("json", "json_object", "regex", "choice", "grammar")
                        if getattr(spec, k))
            raise RequestError(f"structured output {kind} cannot be compiled: "
                               f"{str(e).strip()[:300]}") from None

    def matcher(self, compiled: Any) -> Matcher:
        return Matcher(self._xgr().GrammarMatcher(compiled))

    @staticmethod
    def bitmask_words(vocab_size: int) -> int:
        """int32 words per row of a token bitmask: ceil(V / 32)."""
        return -(-vocab_size // 32)
