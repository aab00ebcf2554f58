"""Batches of tokenized examples: length grouping, right padding, per-epoch deterministic order.

An example is `{"input_ids": list[int], "labels": list[int]}` (from `fora.training.data.encode_records`).
A batch is `{"input_ids", "labels", "attention_mask"}`, LongTensors [B, T], right-padded: pads
carry `pad_id` in `input_ids`, 0 in `attention_mask` and -100 in `labels`. Padding is located by
position, never by value, because `pad_id` often equals `eos_id` and the EOS is supervised.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import overload

import torch

from fora.models.loss import IGNORE_INDEX

Example = Mapping[str, Sequence[int]]
Batch = dict[str, torch.Tensor]


def batch_indices(lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                  group_by_length: bool = True, mega_batch_mult: int = 50,
                  drop_last: bool = False) -> list[list[int]]:
    """Partition `range(len(lengths))` into batches of indices; deterministic given `seed`.

    With `group_by_length`, the (shuffled) order is cut into mega-chunks of
    `mega_batch_mult * batch_size` examples, each chunk is sorted by length (longest first) and cut
    into batches, and the batch order is shuffled — the idea of transformers'
    `LengthGroupedSampler`: batches hold similar lengths (little padding) while the data order
    stays random at the scale of a mega-chunk. Every index appears exactly once (minus the last,
    short batch with `drop_last`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mega_batch_mult < 1:
        raise ValueError(f"mega_batch_mult must be >= 1, got {mega_batch_mult}; 50 is the default")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = mega_batch_mult * batch_size
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and group_by_length:
        rng.shuffle(batches)  # otherwise every chunk would run from long to short batches
    return batches


def collate(examples: Sequence[Example], *, pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Right-pad examples into one batch of LongTensors [B, T] (T = longest, rounded up)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}; 1 = no rounding")
    for ex in examples:
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"example has {len(ex['input_ids'])} input_ids but "
                             f"{len(ex['labels'])} labels; encode it with fora.training.data.encode_record")
    longest = max(len(ex["input_ids"]) for ex in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class LazyBatches(Sequence[Batch]):
    """A list of batches collated on access, so resuming at batch k collates nothing before k."""

    def __init__(self, examples: Sequence[Example], indices: list[list[int]], *, pad_id: int,
                 pad_to_multiple_of: int = 1) -> None:
        self.examples, self.indices = examples, indices
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, k: int) -> Batch: ...
    @overload
    def __getitem__(self, k: slice) -> list[Batch]: ...

    def __getitem__(self, k: int | slice) -> Batch | list[Batch]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return collate(self.batch_examples(k), pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def batch_examples(self, k: int) -> list[Example]:
        """The examples batch `k` collates (a subclass may keep a share of them)."""
        return [self.examples[i] for i in self.indices[k]]


def make_batches(examples: Sequence[Example], batch_size: int, *, pad_id: int, shuffle: bool = True,
                 seed: int = 0, group_by_length: bool = True, mega_batch_mult: int = 50,
                 drop_last: bool = False, pad_to_multiple_of: int = 1) -> list[Batch]:
    """All batches of one pass over `examples`, collated (see `batch_indices` for the order).

    Equals `list(epoch_batches(examples, batch_size, 0, seed, ...))`.
    """
    return list(epoch_batches(examples, batch_size, 0, seed, pad_id=pad_id, shuffle=shuffle,
                              group_by_length=group_by_length, mega_batch_mult=mega_batch_mult,
                              drop_last=drop_last, pad_to_multiple_of=pad_to_multiple_of))


def epoch_seed(seed: int, epoch: int) -> int:
    """The order seed of `epoch`: 64 bits of sha256 of the pair `(seed, epoch)`.

    Every epoch reshuffles reproducibly, and runs over consecutive seeds stay independent: a
    plain `seed + epoch` would give seed s at epoch 1 the order of seed s + 1 at epoch 0.
    """
    return int.from_bytes(hashlib.sha256(f"fora-epoch:{seed}:{epoch}".encode()).digest()[:8], "big")


def epoch_batches(examples: Sequence[Example], batch_size: int, epoch: int, seed: int = 0, *,
                  pad_id: int, shuffle: bool = True, group_by_length: bool = True,
                  mega_batch_mult: int = 50, drop_last: bool = False,
                  pad_to_multiple_of: int = 1) -> LazyBatches:
    """The batches of epoch `epoch`, ordered with `epoch_seed(seed, epoch)`, collated lazily.

    A trainer resumes at (epoch, k) with `epoch_batches(...)[k:]` or by indexing from k: the
    order depends only on (examples, batch_size, seed, epoch, options), never on earlier epochs.
    """
    if not examples:
        raise ValueError("no examples to batch; check the data file and cutoff_len")
    indices = batch_indices([len(ex["input_ids"]) for ex in examples], batch_size,
                            shuffle=shuffle, seed=epoch_seed(seed, epoch), group_by_length=group_by_length,
                            mega_batch_mult=mega_batch_mult, drop_last=drop_last)
    return LazyBatches(examples, indices, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)


class StepBatches(Sequence[list[Batch]]):
    """An epoch's optimizer steps: step k is a list of micro-batches, collated on access.

    `micro` holds every micro-batch of the epoch in order; `steps[k]` is the range of micro-batch
    indices that step k accumulates.
    """

    def __init__(self, micro: Sequence[Batch], steps: list[range]) -> None:
        self.micro, self.steps = micro, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int) -> list[Batch]:  # type: ignore[override]
        return [self.micro[i] for i in self.steps[k]]

    def with_micro(self, micro: Sequence[Batch]) -> StepBatches:
        """The same steps over other micro-batches (e.g. one rank's share of each, `RankBatches`)."""
        return StepBatches(micro, self.steps)


def epoch_steps(examples: Sequence[Example], micro_batch_size: int, grad_accum: int, epoch: int,
                seed: int = 0, *, pad_id: int, **options) -> StepBatches:
    """The optimizer steps of epoch `epoch`: each step's rows drawn at the step's full size, then split.

    The rows of a step are one batch of `epoch_batches` at `micro_batch_size * grad_accum` rows
    (pass the global micro-batch, micro x world, for several processes), cut into consecutive
    micro-batches of `micro_batch_size` rows. So `--batch-size b --grad-accum a` sees exactly the
    rows of `--batch-size a*b` in every step: length grouping picks the rows of a whole step, not
    of each micro-batch. `options` go to `epoch_batches` (shuffle, group_by_length, ...).
    """
    if micro_batch_size < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch_size and grad_accum must be >= 1, got {micro_batch_size}, {grad_accum}")
    whole = epoch_batches(examples, micro_batch_size * grad_accum, epoch, seed, pad_id=pad_id, **options)
    micro, steps = [], []
    for rows in whole.indices:
        first = len(micro)
        micro += [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
        steps.append(range(first, len(micro)))
    return StepBatches(LazyBatches(examples, micro, pad_id=pad_id, pad_to_multiple_of=whole.pad_to_multiple_of),
                       steps)


def calibration_batches(examples: Sequence[Example], n_batches: int, batch_size: int, *,
                        pad_id: int, seed: int = 0) -> list[Batch]:
    """`n_batches` random batches (no example twice) for Fisher / CKA / FIM-LoRA scoring.

    Pass the training examples: Eq. (2) averages gradients over mini-batches of the task data.
    No length grouping, so each batch is a uniform sample.
    """
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches}, {batch_size}")
    need = n_batches * batch_size
    if need > len(examples):
        raise ValueError(f"calibration needs {n_batches} x {batch_size} = {need} examples but only "
                         f"{len(examples)} exist; lower n_batches or batch_size")
    picked = random.Random(seed).sample(range(len(examples)), need)
    return [collate([examples[i] for i in picked[b:b + batch_size]], pad_id=pad_id)
            for b in range(0, need, batch_size)]


def count_tokens(batch: Mapping[str, torch.Tensor], *, supervised: bool = False) -> int:
    """Non-pad tokens of a batch (for tokens/s); with `supervised=True`, tokens with a label."""
    if supervised:
        return int((batch["labels"] != IGNORE_INDEX).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()
