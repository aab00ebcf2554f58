"""Calibration batches for Eq. 2 from plain texts and a transformers tokenizer."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fora.models.loss import IGNORE_INDEX


def text_batches(tokenizer: Any, texts: Sequence[str], *, batch_size: int = 4, max_length: int = 256,
                 num_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Padded batches of ``texts`` with ``labels`` = the ids, -100 at padding (every real token scored).

    The tokenizer's pad token is its eos token where it has none. Eq. 2 averages gradients over
    task data, so pass (a sample of) the training texts.
    """
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings (e.g. dataset['text'])")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
    out = []
    for i in range(0, len(texts), batch_size):
        rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)})
        if num_batches is not None and len(out) == num_batches:
            break
    return out
