"""One row's part of a forward pass: the tokens it feeds, where they sit in the row, the blocks holding the
row's keys and values, and which of its positions get logits.

Light (no torch): the scheduler plans in chunks, rank 0 of a tensor-parallel group sends them to the other
ranks, the paged forward runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL, LAST, NONE = "all", "last", "none"  # which of a chunk's positions get logits


@dataclass
class Chunk:
    """One row's part of a forward pass: ``tokens`` at positions ``start`` .. ``start + len(tokens) - 1``,
    whose keys/values go into (and are read back from) the blocks of ``table``, which must cover every
    position up to the last one. ``logits``: for ``ALL`` positions, the ``LAST`` one, or ``NONE``."""

    tokens: list[int]
    start: int
    table: list[int]
    logits: str = LAST

    @property
    def end(self) -> int:
        """The position after the chunk's last token (the row's length once it has run)."""
        return self.start + len(self.tokens)
