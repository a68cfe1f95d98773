"""Incremental detokenization that never emits half of a multi-byte character.

A fast (Rust) tokenizer streams through its own `DecodeStream`: one call per token, which matters
because the output processor detokenizes every running sequence every step. Other tokenizers take
the Python path: each new token is decoded together with a few tokens of context, and the text it
adds is the decode of (context + new) minus the decode of the context. A decode that ends in U+FFFD
is an incomplete byte sequence, so nothing is emitted until a later token completes it. Both start
from the prompt's last tokens, which keeps SentencePiece-style leading spaces right.
"""

from __future__ import annotations

try:
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers without streaming decode: the Python path below
    Tokenizer = DecodeStream = None

_CONTEXT = 5


def _stream(tokenizer, context: list[int], skip: bool):
    """(DecodeStream, the Rust tokenizer) for a fast tokenizer whose DecodeStream takes a context; else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if DecodeStream is None or not isinstance(backend, Tokenizer):
        return None
    if context and tokenizer.decode(context, skip_special_tokens=skip).endswith("\ufffd"):
        return None  # a context cut inside a character: DecodeStream would stream the context's text too
    try:
        return DecodeStream(ids=context, skip_special_tokens=skip), backend
    except TypeError:  # tokenizers < 0.22: no `ids`, so no context for the first token's leading space
        return None


class IncrementalDetokenizer:
    __slots__ = ("tokenizer", "skip", "ids", "prefix_offset", "read_offset", "_fast")

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._fast = _stream(tokenizer, self.ids, skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Appends a token; returns the text it completes (possibly empty)."""
        if self._fast is not None:
            stream, backend = self._fast
            return stream.step(backend, token_id) or ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character (or a skipped special token): wait
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]
