"""Completion text as tokens arrive: incremental decoding, stop strings and finish reasons, for
each choice of a request (sans-IO: the caller feeds token ids, gets text pieces back).

``ChoiceText`` decodes the choice's whole id list at each token (so the pieces, joined, are
exactly ``decode(ids)``, as ``pipeline.generate`` prints it) and emits what is new, holding back

- a trailing partial UTF-8 character (decoded as U+FFFD) until its last byte arrives, and
- the longest tail of the text that is a prefix of a stop string, until the next tokens show
  whether the stop string completes.

A stop string is looked for in the decoded text, not in tokens (a stop string may span tokens,
or end inside one): at its first occurrence the text is cut before it, the stop string is not
sent, and the choice finishes with "stop". The end token also finishes with "stop" (it is not
decoded or counted); ``max_tokens`` tokens finish with "length". Searching starts where the sent
text ends: no stop string can begin inside sent text, since that text never ends in a prefix of one.
"""
from __future__ import annotations

from typing import Callable, Iterable

Decode = Callable[[list[int]], str]


class ChoiceText:
    """One choice: ``add(token)`` returns the text to send now; ``finish`` is None while it runs,
    then "stop" or "length"; ``tokens`` counts completion tokens (the end token excluded)."""

    def __init__(self, decode: Decode, *, eos_id: int | None, max_tokens: int, stop: Iterable[str] = ()):
        self.decode, self.eos_id, self.max_tokens = decode, eos_id, max_tokens
        self.stop = tuple(stop)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        self.ids: list[int] = []
        self.text = ""          # decoded so far
        self.sent = ""          # handed out so far (a prefix of text)
        self.finish: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def add(self, token: int) -> str:
        if self.finish is not None:
            return ""
        if token == self.eos_id:
            return self._end("stop", len(self.text))
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = min((i for s in self.stop if (i := self.text.find(s, len(self.sent))) >= 0), default=-1)
        if cut >= 0:
            return self._end("stop", cut)
        if len(self.ids) >= self.max_tokens:
            return self._end("length", len(self.text))
        if self.text.endswith("\ufffd"):
            return ""
        return self._send(len(self.text) - self._held())

    def close(self) -> str:
        """Generation ended without this choice finishing (the session's last step): "length"."""
        return "" if self.finish is not None else self._end("length", len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that begins some stop string (and could complete it)."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text) - len(self.sent)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _send(self, upto: int) -> str:
        if upto <= len(self.sent):
            return ""
        piece, self.sent = self.text[len(self.sent):upto], self.text[:upto]
        return piece

    def _end(self, reason: str, upto: int) -> str:
        self.finish = reason
        return self._send(upto)


class Choices:
    """The choices of one batched session, row i = choice i. ``add(step)`` takes one token per
    row and returns ``(index, piece, finish)`` for every row that has text to send or just finished."""

    def __init__(self, rows: int, decode: Decode, *, eos_id: int | None, max_tokens: int, stop: Iterable[str] = ()):
        stop = tuple(stop)
        self.rows = [ChoiceText(decode, eos_id=eos_id, max_tokens=max_tokens, stop=stop) for _ in range(rows)]

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.rows)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.rows)

    def add(self, step: list[int]) -> list[tuple[int, str, str | None]]:
        if len(step) != len(self.rows):
            raise ValueError(f"a step of {len(step)} tokens for {len(self.rows)} choices")
        return self._events([(c, c.finish, c.add(t)) for c, t in zip(self.rows, step)])

    def close(self) -> list[tuple[int, str, str | None]]:
        return self._events([(c, c.finish, c.close()) for c in self.rows])

    def _events(self, results) -> list[tuple[int, str, str | None]]:
        return [(i, piece, c.finish if before is None else None) for i, (c, before, piece) in enumerate(results)
                if piece or (before is None and c.finish is not None)]
