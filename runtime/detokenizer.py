"""Streaming detokenization and stop-string matching.

``IncrementalDetokenizer`` turns output token ids into text one token at a time. Each step
decodes a short window of tokens twice, with and without the tokens not yet emitted, and emits
the difference. While the decoded window ends in U+FFFD the bytes seen so far stop inside a
multi-byte character, so nothing is emitted until a later token completes it.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5


def _backend_decoder(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a Hugging Face fast tokenizer whose decoding is the
    stock one, or None. Without clean-up, the stock ``decode`` is exactly the backend's decode
    behind a few layers of argument handling that cost more than the decode of a short window."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    if cls.decode is not PreTrainedTokenizerFast.decode or cls._decode is not PreTrainedTokenizerFast._decode:
        return None
    return getattr(tokenizer, "_tokenizer", None)


class IncrementalDetokenizer:
    """Decodes one sequence's output tokens as they arrive.

    The last few prompt tokens seed the decoding window, so the first output token is decoded
    as a continuation of the prompt (which matters to tokenizers that treat a leading space
    specially). For byte-level BPE tokenizers the concatenated deltas, after :meth:`flush`,
    equal ``tokenizer.decode(output_ids, skip_special_tokens=...)``.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._backend = _backend_decoder(tokenizer)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # Start the window after any tail of the context that does not decode cleanly, so
        # that a cut through a character in the prompt cannot leak into the output text.
        while context and self._decode(context).endswith(_REPLACEMENT):
            context.pop()
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._output_start = len(context)
        self._text_parts: list[str] = []
        self._text_len = 0

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Take the next output token; return the text it finalises ("" if none yet)."""
        self._tokens.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (call once the sequence has finished).

        Held-back text is either an incomplete character, which the one-shot decode shows as
        U+FFFD too, or a genuine U+FFFD at the end of the output.
        """
        if self._read_offset >= len(self._tokens):
            return ""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        window = self._tokens[self._prefix_offset:]
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        new_text = self._decode(window)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""
        if not new_text.startswith(prefix_text):
            # The context no longer decodes the same way with the new tokens after it
            # (a decoder that merges across token boundaries); fall back to the full output.
            delta = self._full_output_text()[self._text_len:]
        else:
            delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        if delta:
            self._text_parts.append(delta)
            self._text_len += len(delta)
        return delta

    def _full_output_text(self) -> str:
        return self._decode(self._tokens[self._output_start:])

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    @property
    def token_ids(self) -> list[int]:
        """The output token ids taken so far."""
        return self._tokens[self._output_start:]


def find_stop(text: str, new_start: int, stops: list[str]) -> tuple[int, str] | None:
    """Find the earliest stop string that overlaps the new text ``text[new_start:]``.

    Only matches ending at or after ``new_start`` are considered (earlier ones would have been
    found on an earlier call), so the search covers ``text[new_start - len(stop) + 1:]`` for each
    stop. Returns ``(index where the match starts, the stop string)``, or ``None``. Among matches
    starting at the same index the shortest wins, since it is complete first when streaming.
    """
    best: tuple[int, str] | None = None
    new_start = max(0, min(new_start, len(text)))
    for stop in stops:
        if not stop:
            continue
        idx = text.find(stop, max(0, new_start - len(stop) + 1))
        if idx < 0:
            continue
        if best is None or idx < best[0] or (idx == best[0] and len(stop) < len(best[1])):
            best = (idx, stop)
    return best


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` are a proper prefix of some stop string.

    Those characters may yet turn into a stop string, so a streaming client should not see
    them until more text arrives (or the sequence ends).
    """
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold
