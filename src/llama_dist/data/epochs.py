"""Epoch bookkeeping the fine-tuning loaders share: a position in epochs laid end to end,
and held-out batches that keep every data-parallel rank's batch count equal.

A loader's state is one integer (the items consumed), so a checkpoint resumes exactly at any
data-parallel size; the items of epoch e come from `epoch_items(e)`, a deterministic function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def items_at(epoch_items: Callable[[int], Sequence[T]], start: int, count: int) -> list[T]:
    """Items [start, start + count) of the epochs laid end to end (an epoch's leftover items
    open the next one)."""
    items: list[T] = []
    epoch, offset = 0, start
    while len(items) < count:
        current = epoch_items(epoch)
        if not current:
            raise ValueError(f"epoch {epoch} has no items")
        if offset >= len(current):
            offset -= len(current)
            epoch += 1
            continue
        take = current[offset : offset + count - len(items)]
        items += take
        offset += len(take)
    return items


def epochs_done(epoch_items: Callable[[int], Sequence], consumed: int) -> float:
    """Epochs completed after `consumed` items (fractional)."""
    epoch = 0
    while consumed >= (n := len(epoch_items(epoch))):
        consumed -= n
        epoch += 1
    return epoch + consumed / n


def rank_chunks(
    items: Sequence[T], *, micro_batch: int, dp_rank: int, dp_size: int
) -> Iterator[tuple[list[T], list[bool]]]:
    """This rank's share of `items` in chunks of `micro_batch`, with which entries are real.

    Every rank yields the same number of chunks (forwards are collective under FSDP); entries
    past the end repeat item 0 and are marked False, so they run but do not count.
    """
    per_batch = micro_batch * dp_size
    for b in range(-(-len(items) // per_batch)):
        start = (b * dp_size + dp_rank) * micro_batch
        real = [p < len(items) for p in range(start, start + micro_batch)]
        chunk = [
            items[p] if ok else items[0]
            for p, ok in zip(range(start, start + micro_batch), real, strict=True)
        ]
        yield chunk, real


class EpochLoader:
    """Training micro-batches of one data-parallel rank, one optimizer step per `next()`.

    Step s takes items [s * global_batch, (s + 1) * global_batch) of the epochs laid end to
    end (`epoch_items(e)`; an epoch's leftover items open the next step); rank r takes its
    contiguous share, `micro_batch` items per micro-batch, made by `make_batch`. The position
    is one integer, saved under `state_key`, so a checkpoint resumes exactly at any
    data-parallel size.
    """

    def __init__(
        self,
        epoch_items: Callable[[int], Sequence[Any]],
        make_batch: Callable[[list[Any]], dict[str, torch.Tensor]],
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        state_key: str,
        unit: str,
    ) -> None:
        if global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"global batch of {global_batch} {unit} is not divisible by micro_batch "
                f"({micro_batch}) x data-parallel size ({dp_size})"
            )
        self.epoch_items = epoch_items
        self.make_batch = make_batch
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.per_rank = global_batch // dp_size
        self.state_key = state_key
        self.consumed = 0

    def epoch(self) -> float:
        """Epochs completed by the steps taken so far (fractional)."""
        return epochs_done(self.epoch_items, self.consumed)

    def __iter__(self) -> EpochLoader:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        first = self.consumed + self.dp_rank * self.per_rank
        items = items_at(self.epoch_items, first, self.per_rank)
        self.consumed += self.global_batch
        return [
            self.make_batch(items[i : i + self.micro_batch])
            for i in range(0, self.per_rank, self.micro_batch)
        ]

    def state_dict(self) -> dict[str, int]:
        return {self.state_key: self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state[self.state_key])
