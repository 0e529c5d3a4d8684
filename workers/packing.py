"""Batches for training: packing examples into blocks, padding, shuffling, data-parallel sharding, resume.

An epoch is planned as a deterministic function of (lengths, seed, epoch): the examples are
shuffled, packed best-fit into rows of at most `block_len` tokens (or one example per row when
packing is off), the rows shuffled again and cut into *global* micro-batches of
`batch_size * world_size` rows. Rank r of `world_size` takes its share of each global micro-batch,
so 1 worker with batch_size 4 and 2 workers with batch_size 2 see the same rows per step.

A packed row never attends across example boundaries: `position_ids` restart at 0 for each
example, and the attention is kept inside each example in one of three ways (`block_mask`):
- `"varlen"` (what the training loop uses): no mask at all, but the cumulative lengths of the
  segments of the flattened rows, `cu_seq_lens_q` (int32, n_segments + 1) and the longest,
  `max_length_q` (and, for the exact CPU path, the same bounds as Python ints, `cu_seq_lens_host`),
  computed once per micro-batch, for the attention of `workers.attention`
  (variable-length flash attention on CUDA, exact per-segment SDPA on CPU). It applies to unpacked
  rows too: an example and its padding are two segments.
- `"4d"` (the default): a block-diagonal causal (B, 1, T, T) `attention_mask`, which transformers 5
  uses as-is with the sdpa and eager attention; it costs T² per row and keeps sdpa off its flash kernel.
- `"position_ids"`: neither; transformers derives the 4D mask from the restarting positions, but only
  when no KV cache is built: call the model with `use_cache=False`, or a Llama model in eval mode
  silently attends across examples.
Padding is a segment of its own at the end of a row and never carries loss.

Where the data stands is a `DataPosition(epoch, batch_index)`: the global micro-batch to process
next. Saving it with a checkpoint and passing it back to `make_batches` resumes exactly.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from workers.tokenization import IGNORE_INDEX, TokenizedExample

__all__ = [
    "Batch",
    "DataPosition",
    "count_batches",
    "make_batches",
    "plan_epoch",
]

BlockMask = Literal["varlen", "4d", "position_ids"]


@dataclass(frozen=True)
class DataPosition:
    """The next global micro-batch to process: `batch_index` within `epoch` (both 0-based).

    It is exact only for the same examples, seed, packing, block_len and `batch_size * world_size`.
    """

    epoch: int = 0
    batch_index: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.batch_index < 0:
            raise ValueError(f"DataPosition fields must be >= 0, got {self}")

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(data["epoch"]), batch_index=int(data["batch_index"]))


@dataclass(frozen=True)
class Batch:
    """One rank's micro-batch. `model(**batch.inputs)` runs it; `inputs["labels"]` uses -100 for no loss.

    `n_loss_tokens` counts the targets in this micro-batch after the model's causal shift. To weigh
    every token equally across gradient accumulation and data-parallel ranks, sum the per-token loss
    and divide by the total `n_loss_tokens` of the optimizer step over all ranks (all-reduce it), not
    by each micro-batch's own count. A rank may receive a padding-only row (`n_loss_tokens == 0`) at
    the end of an epoch so every rank runs the same number of steps; its loss sum is 0.
    """

    inputs: dict[str, torch.Tensor | int | tuple[int, ...]]  # tensors; with "varlen" also ints (see _collate)
    n_loss_tokens: int
    n_tokens: int  # real (non-padding) tokens in this micro-batch
    n_examples: int
    position: DataPosition  # this micro-batch
    next_position: DataPosition  # where to resume once it is consumed
    # Flat indices into (B, T) of the positions whose next token carries loss (int64, ascending):
    # computed here from the host's lists, so that selecting them on a device needs no boolean mask,
    # whose nonzero would make the host wait for the device.
    loss_positions: torch.Tensor | None = None

    @property
    def is_last_in_epoch(self) -> bool:
        return self.next_position.epoch != self.position.epoch


def _epoch_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    # A str seed is hashed (sha512) by random.Random: stable across runs and Python versions.
    return random.Random(f"lorafleet:{purpose}:{seed}:{epoch}")


def _pack_best_fit(order: Sequence[int], lengths: Sequence[int], block_len: int) -> list[list[int]]:
    """Put each example (in `order`) into the open row with the least room that still fits it."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index) of rows with room
    for i in order:
        n = lengths[i]
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            rows[row].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, row))
        else:
            rows.append([i])
            if block_len - n > 0:
                bisect.insort(free, (block_len - n, len(rows) - 1))
    return rows


def plan_epoch(
    lengths: Sequence[int],
    *,
    block_len: int,
    batch_size: int,
    packing: bool = True,
    seed: int,
    epoch: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> list[list[list[int]]]:
    """The epoch's global micro-batches, each a list of rows, each row a list of example indices.

    Pure and deterministic: the same arguments give the same plan on every rank and on resume.
    Only the cut into global micro-batches depends on `world_size`.
    """
    if block_len < 2 or batch_size < 1 or world_size < 1:
        raise ValueError(
            f"need block_len >= 2, batch_size >= 1, world_size >= 1; got {block_len}, {batch_size}, {world_size}"
        )
    too_long = [i for i, n in enumerate(lengths) if n > block_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples are longer than block_len={block_len} (first: index {too_long[0]}, "
            f"{lengths[too_long[0]]} tokens); tokenize with max_seq_len <= block_len"
        )
    order = [i for i, n in enumerate(lengths) if n > 0]
    if shuffle:
        _epoch_rng(seed, epoch, "examples").shuffle(order)
    rows = _pack_best_fit(order, lengths, block_len) if packing else [[i] for i in order]
    if shuffle and packing:
        _epoch_rng(seed, epoch, "rows").shuffle(rows)
    per_step = batch_size * world_size
    return [rows[k : k + per_step] for k in range(0, len(rows), per_step)]


def count_batches(
    lengths: Sequence[int],
    *,
    block_len: int,
    batch_size: int,
    packing: bool = True,
    seed: int,
    epoch: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> int:
    """Number of global micro-batches (= steps of each rank) in `epoch`; with packing it varies by epoch."""
    return len(
        plan_epoch(
            lengths,
            block_len=block_len,
            batch_size=batch_size,
            packing=packing,
            seed=seed,
            epoch=epoch,
            world_size=world_size,
            shuffle=shuffle,
        )
    )


def _rank_share(rows: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Rank `rank`'s rows of a global micro-batch: contiguous, as even as possible (sizes differ by <= 1)."""
    base, extra = divmod(len(rows), world_size)
    start = rank * base + min(rank, extra)
    return rows[start : start + base + (1 if rank < extra else 0)]


def _collate(
    rows: list[list[int]],
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    packed: bool,
    block_mask: BlockMask,
    mask_dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor | int | tuple[int, ...]], torch.Tensor]:
    """Tensors for `model(**inputs)`, padded on the right to the longest row, and the loss positions."""
    width = max(1, max(sum(len(examples[i]) for i in row) for row in rows))
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.zeros((n_rows, width), dtype=torch.long)  # example number within the row; pad = last
    loss_positions: list[int] = []
    for r, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            n = len(examples[i])
            # position t + k - 1 of the row predicts its token t + k: labels from the second token on
            loss_positions += [r * width + t + k - 1 for k, y in enumerate(examples[i].labels)
                               if k > 0 and y != IGNORE_INDEX]
            input_ids[r, t : t + n] = torch.tensor(examples[i].input_ids, dtype=torch.long)
            labels[r, t : t + n] = torch.tensor(examples[i].labels, dtype=torch.long)
            position_ids[r, t : t + n] = torch.arange(n)
            segment[r, t : t + n] = s
            t += n
        position_ids[r, t:] = torch.arange(width - t)
        segment[r, t:] = len(row)
    inputs: dict[str, torch.Tensor | int] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if block_mask == "varlen":
        lengths = [n for row in rows for n in _segment_lengths(row, examples, width)]
        inputs["cu_seq_lens_q"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        inputs["max_length_q"] = max(lengths)
        inputs["cu_seq_lens_host"] = tuple(itertools.accumulate(lengths, initial=0))  # the same, as ints
    elif not packed:
        inputs["attention_mask"] = (segment == 0).long()  # (B, T) 1 = real token
    elif block_mask == "4d":
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
        if mask_dtype == torch.bool:
            mask = allowed
        else:  # additive, as eager attention adds it to the scores; sdpa takes it as well
            mask = torch.zeros(allowed.shape, dtype=mask_dtype)
            mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)
        inputs["attention_mask"] = mask[:, None]  # (B, 1, T, T)
    return inputs, torch.tensor(loss_positions, dtype=torch.long)


def _segment_lengths(row: list[int], examples: Sequence[TokenizedExample], width: int) -> list[int]:
    """Lengths of a row's segments: its examples, then its padding (if any); they sum to `width`."""
    lengths = [len(examples[i]) for i in row if len(examples[i]) > 0]
    padding = width - sum(lengths)
    return [*lengths, padding] if padding > 0 else lengths


def make_batches(
    examples: Sequence[TokenizedExample],
    *,
    block_len: int,
    batch_size: int,
    packing: bool = True,
    pad_id: int,
    seed: int,
    position: DataPosition = DataPosition(),
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    block_mask: BlockMask = "4d",
    mask_dtype: torch.dtype = torch.float32,
) -> Iterator[Batch]:
    """Yield rank `rank`'s micro-batches of `position.epoch`, from global micro-batch `position.batch_index`.

    `batch_size` is rows per rank per micro-batch (a row is a packed block of up to `block_len`
    tokens, or one example when `packing=False`, padded to the longest in the batch). Every rank
    yields the same number of batches. With `block_mask="4d"`, `mask_dtype` should be the model's compute dtype for an
    additive mask (sdpa requires a float mask to match the query dtype), or torch.bool for sdpa only.
    Iterate epochs by calling again with `DataPosition(epoch + 1, 0)`; `Batch.next_position` says so.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    lengths = [len(e) for e in examples]
    plan = plan_epoch(
        lengths,
        block_len=block_len,
        batch_size=batch_size,
        packing=packing,
        seed=seed,
        epoch=position.epoch,
        world_size=world_size,
        shuffle=shuffle,
    )
    if position.batch_index > len(plan):
        raise ValueError(f"{position} is past the end of epoch {position.epoch} ({len(plan)} batches)")
    for index in range(position.batch_index, len(plan)):
        rows = _rank_share(plan[index], rank, world_size)
        if not rows:
            rows = [[]]  # padding-only row: this rank still takes part in the step, contributing no loss
        inputs, loss_positions = _collate(
            rows, examples, pad_id=pad_id, packed=packing, block_mask=block_mask, mask_dtype=mask_dtype
        )
        nxt = DataPosition(position.epoch, index + 1) if index + 1 < len(plan) else DataPosition(position.epoch + 1, 0)
        yield Batch(
            inputs=inputs,
            n_loss_tokens=len(loss_positions),
            n_tokens=sum(lengths[i] for row in rows for i in row),
            n_examples=sum(len(row) for row in rows),
            position=DataPosition(position.epoch, index),
            next_position=nxt,
            loss_positions=loss_positions,
        )
