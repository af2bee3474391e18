"""Structured output: JSON grammars compiled with xgrammar, one matcher per constrained sequence.

``GrammarCompiler`` turns an OpenAI ``response_format`` into a compiled grammar (cached by the
canonical JSON of the request's format) and hands out ``Matcher`` objects. A matcher answers which
tokens may come next as a bool mask over the model's vocabulary, and follows the tokens the
sampler picked. The end-of-sequence tokens are allowed only where the grammar may end.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

_SHIFTS = torch.tensor([1 << i if i < 31 else -(1 << 31) for i in range(32)], dtype=torch.int32)


class Matcher:
    """Grammar state of one sequence."""

    def __init__(self, compiled, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self._m = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)
        self.vocab_size = vocab_size
        words = (vocab_size + 31) // 32
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._bits = torch.empty((words, 32), dtype=torch.int32)
        self._mask = torch.empty(words * 32, dtype=torch.bool)
        self._all = torch.ones(vocab_size, dtype=torch.bool)
        self.num_accepted = 0

    def allowed_mask(self) -> torch.Tensor:
        """Bool [vocab_size] on the CPU: True where the token may come next.

        The returned tensor is this matcher's own buffer, rewritten by the next call."""
        if self._m.is_terminated():
            return self._all
        need = self._m.fill_next_token_bitmask(self._bitmask, 0)
        if not need:
            return self._all
        torch.bitwise_and(self._bitmask[0].unsqueeze(1), _SHIFTS, out=self._bits)
        torch.ne(self._bits.view(-1), 0, out=self._mask)
        return self._mask[: self.vocab_size]

    def accept(self, token_id: int) -> bool:
        """Advances past the sampled token; False if the grammar rejects it."""
        ok = bool(self._m.accept_token(int(token_id)))
        if ok:
            self.num_accepted += 1
        return ok

    def is_terminated(self) -> bool:
        """True once the output is complete (a stop token was accepted after a full match)."""
        return bool(self._m.is_terminated())

    def is_completed(self) -> bool:
        """True where the output so far is a complete match (a stop token may come next)."""
        return bool(self._m.is_completed())


class GrammarCompiler:
    """Compiles ``response_format`` values for one tokenizer; compiled grammars are cached."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int] | None = None, cache_size: int = 64):
        try:
            import xgrammar as xgr
        except ImportError:
            raise ValueError("response_format needs the xgrammar package, which this server lacks: "
                             "pip install xgrammar (a kiln dependency)") from None

        self.vocab_size = int(vocab_size)
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            stop_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.stop_token_ids = [int(t) for t in stop_token_ids if 0 <= int(t) < self.vocab_size]
        self._info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
        )
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=2)
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, response_format: dict):
        """The compiled grammar for a response format; ValueError if it cannot be compiled."""
        key = self._key(response_format)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(response_format)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, response_format: dict) -> Matcher:
        return Matcher(self.compile(response_format), self.vocab_size, self.stop_token_ids)

    @staticmethod
    def _key(response_format: dict) -> str:
        try:
            return json.dumps(response_format, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"response_format is not JSON-serialisable: {e}") from None

    def _compile(self, response_format: dict):
        if not isinstance(response_format, dict):
            raise ValueError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "json_object":
            schema: object = {"type": "object"}
            strict = False
        elif kind == "json_schema":
            js = response_format.get("json_schema")
            if not isinstance(js, dict):
                raise ValueError("response_format.json_schema must be an object")
            schema = js.get("schema", {"type": "object"})
            if isinstance(schema, bool) or not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            strict = True
        else:
            raise ValueError(f"response_format.type {kind!r} is not supported: use 'json_object' or 'json_schema'")
        try:
            text = json.dumps(schema)
            return self._compiler.compile_json_schema(
                text, any_whitespace=False, strict_mode=strict
            )
        except Exception as e:  # xgrammar raises RuntimeError on schemas it cannot handle
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", msg)
            raise ValueError(f"invalid JSON schema in response_format: {msg}") from None


__all__ = ["GrammarCompiler", "Matcher"]
