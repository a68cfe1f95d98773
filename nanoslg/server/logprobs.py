"""Logprobs in OpenAI's two shapes: completions' parallel lists (tokens, token_logprobs,
top_logprobs, text_offset) and chat's per-token objects.

`text_offset[i]` is where token i's text starts in the returned text, found by detokenizing as the
text was: a special token the text leaves out (BOS) has no width, and the byte tokens of one
character all start where that character does.
"""

from __future__ import annotations

from nanoslg.engine.detokenizer import IncrementalDetokenizer
from nanoslg.server import protocol as P


class Logprobs:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tok_cache: dict[int, str] = {}

    def tok_str(self, tid: int) -> str:
        s = self._tok_cache.get(tid)
        if s is None:
            tok = self.tokenizer
            try:
                s = tok.decode([tid]) if tok is not None else f"token_id:{tid}"
            except Exception:  # an id the tokenizer lacks (a padded embedding row)
                s = f"token_id:{tid}"
            if len(self._tok_cache) < 1_000_000:
                self._tok_cache[tid] = s
        return s

    def offsets(self, context: list[int], ids: list[int], start: int, skip_special: bool = True) -> list[int]:
        """Where each of `ids` starts in a text that begins at `start`, `context` decoded before them."""
        if self.tokenizer is None:
            return [start] * len(ids)
        detok = IncrementalDetokenizer(self.tokenizer, context, skip_special)
        out = []
        for t in ids:
            piece = detok.add(t)
            out.append(start + self.start_in(piece, t))
            start += len(piece)
        return out

    def start_in(self, piece: str, tid: int) -> int:
        """Where token `tid`'s text starts in the text it completed: a piece may begin with a
        character that earlier tokens left incomplete, and the token's own text is its end."""
        own = self.tok_str(tid)
        return len(piece) - len(own) if own and "\ufffd" not in own and piece.endswith(own) else 0

    def completion(
        self, lps: list, offsets: list[int], prompt_ids: list[int] | None = None, prompt_offsets: list[int] = ()
    ) -> P.CompletionLogprobs:
        """Echoed prompt tokens first (no logprob: the engine scores none), then the generated ones."""
        out = P.CompletionLogprobs()
        for tid, off in zip(prompt_ids or [], prompt_offsets):
            out.tokens.append(self.tok_str(tid))
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(off)
        for lp, off in zip(lps, offsets):
            out.tokens.append(self.tok_str(lp.token_id))
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.tok_str(t): v for t, v in lp.top})
            out.text_offset.append(off)
        return out

    def chat(self, lps: list) -> P.ChatLogprobs:
        content = []
        for lp in lps:
            s = self.tok_str(lp.token_id)
            top = [P.TopLogprob(self.tok_str(t), v, list(self.tok_str(t).encode())) for t, v in lp.top]
            content.append(P.ChatTokenLogprob(s, lp.logprob, list(s.encode()), top))
        return P.ChatLogprobs(content)
