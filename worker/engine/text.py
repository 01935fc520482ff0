"""A sequence's text as it grows: incremental detokenization and stop sequences, at a cost per token that
does not grow with the text.

Each sequence keeps a ``tokenizers`` ``DecodeStream``: every new token yields only the characters it
completes (a byte-level token may end half-way through a UTF-8 character; those bytes wait for the next
token), so the text is never decoded again from the start while the job runs. Bytes that never become a
character (a random or broken model can emit them for ever) are let through as U+FFFD after
``HOLD_LIMIT`` tokens, as the final decode shows them, so the work per token stays bounded. Stop sequences are looked
for only in the part of the text a new token could have completed. The final text is decoded once from all
the tokens, so it is exactly what ``tokenizer.decode`` gives.

Why a sequence stops is decided here too: canceled or out of time (whatever the model says), its end-of-
sequence token, a stop sequence in its text, or its length.
"""

from __future__ import annotations

import time
from typing import Any

from tokenizers.decoders import DecodeStream

from worker.engine.outputs import FinishReason
from worker.engine.sequence import Sequence

# A UTF-8 character is at most 4 bytes and a byte-level token at least one: text held back longer than
# this never completes.
HOLD_LIMIT = 8


class TextTracker:
    """Keeps ``seq.text`` up to date token by token and says when a stop sequence has appeared."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # The fast tokenizer's Rust backend, which DecodeStream steps through.
        self._backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer._tokenizer

    def add(self, seq: Sequence, token: int) -> bool:
        """Account for ``seq``'s newest token; True when the text now holds one of its stop sequences."""
        if seq.decoder is None:
            seq.decoder = DecodeStream(skip_special_tokens=True)
        piece = seq.decoder.step(self._backend, token)  # type: ignore[attr-defined]
        if not piece:
            seq.held += 1
            if seq.held < HOLD_LIMIT:
                return False
            # Start afresh after the held tokens (byte-level pieces decode alike alone or in context).
            piece = self.tokenizer.decode(seq.tokens[-seq.held :], skip_special_tokens=True)
            seq.decoder = DecodeStream(skip_special_tokens=True)
        seq.held = 0
        if not piece:
            return False
        before = len(seq.text)
        seq.text += piece
        if not seq.stop:
            return False
        longest = max(len(stop) for stop in seq.stop)
        if len(seq.tokens) <= seq.min_new_tokens:
            # Still inside min_new_tokens: no stop sequence yet; one may begin in the last characters.
            seq.stops_from = max(0, len(seq.text) - longest + 1)
            return False
        window = seq.text[max(seq.stops_from, before - longest + 1) :]
        return any(stop in window for stop in seq.stop)

    def finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Account for ``seq``'s newest token: why the sequence ends with it, or None while it goes on."""
        stopped = stop_reason(seq)
        if stopped is not None:
            seq.unrecord()  # the token chosen in this step is not kept: the job ended before it
            return stopped
        hit_stop = self.add(seq, token)
        if token in seq.eos_token_ids and not seq.ignore_eos:
            return FinishReason.EOS_TOKEN
        if hit_stop:
            return FinishReason.STOP_SEQUENCE
        if seq.remaining <= 0:
            return FinishReason.LENGTH
        return None

    def ending(self, seq: Sequence, reason: FinishReason | None) -> str:
        """The text ``seq`` ends with for ``reason``: what was shown so far when it was canceled or ran out
        of time, else its whole text (up to the stop sequence it ended on)."""
        if reason in (FinishReason.CANCELED, FinishReason.TIMEOUT):
            return TextTracker.partial(seq)
        return self.final(seq, cut_at_stop=reason is FinishReason.STOP_SEQUENCE)

    def final(self, seq: Sequence, cut_at_stop: bool) -> str:
        """The sequence's whole text, decoded once from all its tokens; up to its first stop sequence when
        it ended on one."""
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if cut_at_stop:
            cut = first_stop(text, seq.stop, seq.stops_from)
            if cut is not None:
                text = text[:cut]
        return text

    @staticmethod
    def partial(seq: Sequence) -> str:
        """The text so far, safe to show while the sequence runs: without a stop sequence that has appeared,
        and holding back the characters that may be the start of one."""
        text = seq.text
        if seq.stop:
            cut = first_stop(text, seq.stop, seq.stops_from)
            if cut is not None:
                return text[:cut]
            text = text[: max(0, len(text) - (max(len(s) for s in seq.stop) - 1))]
        return text.rstrip("\ufffd")  # a final decode may end half-way through a character


def first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """The index where the earliest stop sequence beginning at ``start`` or later is in ``text``, if any."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stop_reason(seq: Sequence) -> FinishReason | None:
    """Canceled or out of time: stop whatever the model says."""
    if seq.cancelled:
        return FinishReason.CANCELED
    if seq.deadline is not None and time.perf_counter() >= seq.deadline:
        return FinishReason.TIMEOUT
    return None
