"""Packing (``data.packing: true``): several tokenised examples per row of at most ``max_seq_len``
tokens, so a micro-batch of ``train.micro_batch_size`` rows carries about that many rows' worth of
tokens whatever the examples' lengths.

The rows are bins and the examples items of a bin-packing problem, solved by **first-fit
decreasing** (Johnson 1973, "Near-optimal bin packing algorithms"; at most 11/9·OPT + 6/9 rows,
Dósa 2007): examples longest first (ties by their index), each into the first row with room for
it, a new row when none has. It depends on the lengths only, so the same data always packs
the same way; the seed then shuffles the *rows* each epoch (:func:`micro_batches`, the order of
:func:`peftcli.data.batches`), which makes the packed stream, and a resumed run's position in
it, reproducible from ``train.seed``.

A micro-batch's examples are collated by :func:`peftcli.data.collate_padding_free` into one row
with ``position_ids`` restarting per example: attention stays inside each example and every
example's first label is -100, as in an unpacked padding-free micro-batch. The trainer's loss
is the sum over the step's supervised tokens divided by their count
(:func:`peftcli.trainer.accumulate_gradients`), which does not depend on how examples are grouped
into rows: a packed micro-batch trains exactly like an unpacked one holding the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli import data
from peftcli.errors import UserError


@dataclass(frozen=True)
class Packing:
    """The packed train set: ``rows[j]`` the indices (into the train examples) of row j's
    examples, in the order they sit in the row; ``max_seq_len`` each row's capacity (tokens);
    ``tokens`` the examples' summed length."""

    rows: list[list[int]]
    max_seq_len: int
    tokens: int

    @property
    def examples(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def fill(self) -> float:
        """The fraction of the rows' capacity (rows × max_seq_len) holding tokens, 0..1."""
        return self.tokens / max(1, len(self.rows) * self.max_seq_len)

    def describe(self) -> str:
        """The console line."""
        return (f"packing: {self.examples} examples into {len(self.rows)} rows of up to max_seq_len "
                f"{self.max_seq_len} (fill {100 * self.fill:.1f}%)")

    def as_json(self) -> dict:
        """summary.json's ``packing`` field."""
        return {"examples": self.examples, "rows": len(self.rows), "max_seq_len": self.max_seq_len,
                "tokens": self.tokens, "fill_pct": round(100 * self.fill, 2)}


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin packing by first-fit decreasing (see the module docstring).

    Args:
        lengths: item sizes (tokens), each 1..``capacity``.
        capacity: a bin's size (tokens).
    Returns:
        the bins in the order they were opened, each the item indices it holds in the order they
        were put in (longest first); every index exactly once, each bin's total <= ``capacity``.
    Raises:
        ValueError: an item larger than ``capacity`` or not positive.
    Cost: O(n log n) — the first bin with room is found in a max-tree over the bins' free space
    (unopened bins have all of it, so the first fit is an open bin or the next new one).
    """
    bad = next((i for i, n in enumerate(lengths) if not 0 < n <= capacity), None)
    if bad is not None:
        raise ValueError(f"item {bad} has size {lengths[bad]}, outside 1..{capacity}")
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [capacity] * (2 * size)  # free[size + b]: bin b's free space; free[k] = max of its children
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = 1
        while k < size:  # descend to the leftmost leaf with room
            k = 2 * k if free[2 * k] >= lengths[i] else 2 * k + 1
        b = k - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[k] -= lengths[i]
        while k > 1:
            k //= 2
            free[k] = max(free[2 * k], free[2 * k + 1])
    return bins


def pack(examples: list[dict], max_seq_len: int) -> Packing:
    """Pack tokenised examples (``input_ids``, at most ``max_seq_len`` each, as
    :func:`peftcli.data.tokenize_rows` makes them) into rows (:func:`first_fit_decreasing`).

    Raises:
        UserError: an example longer than ``max_seq_len`` (it fits no row).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    longer = next((i for i, n in enumerate(lengths) if n > max_seq_len), None)
    if longer is not None:
        raise UserError(f"data.packing: train example {longer + 1} has {lengths[longer]} tokens, more than "
                        f"data.max_seq_len {max_seq_len}, so it fits no packed row; raise data.max_seq_len")
    return Packing(first_fit_decreasing(lengths, max_seq_len), max_seq_len, sum(lengths))


def micro_batches(rows: list[list[int]], micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of packed micro-batches as example-index lists: the rows in the seeded order of
    :func:`peftcli.data.batches` (``seed + epoch``), ``micro_batch_size`` rows per micro-batch,
    each micro-batch their examples in row order."""
    return [[i for r in chunk for i in rows[r]] for chunk in data.batches(rows, micro_batch_size, seed, epoch)]


def largest_micro_batch(rows: list[list[int]], examples: list[dict], micro_batch_size: int) -> list[dict]:
    """The examples of the ``micro_batch_size`` rows with the most tokens (the peak-memory micro-batch)."""
    tokens = lambda r: sum(len(examples[i]["input_ids"]) for i in r)  # noqa: E731
    return [examples[i] for r in sorted(rows, key=tokens, reverse=True)[:micro_batch_size] for i in r]


def refuse_method(method_name: str, method) -> str | None:
    """The one-line refusal for a method that cannot train on packed rows (its module's
    ``PADDING_FREE`` is False: it adds virtual tokens to every row), or None."""
    if getattr(method, "PADDING_FREE", True):
        return None
    return (f"data.packing: method {method_name} adds virtual tokens to each row, so examples packed into one row "
            "cannot each get theirs; set data.packing: false (it trains on padded rows)")
