"""The causal-LM loss that Fisher scoring (Eq. 2's L_b) and training share.

Labels are aligned with ``input_ids`` (Hugging Face's convention): position t's logits predict
token t+1, and ``IGNORE_INDEX`` marks positions that carry no loss (prompt, padding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # torch's default ignore_index


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy and the number of supervised tokens.

    Args:
        logits: [B, T, V] in any dtype (upcast to float32 here, so bf16 runs do not lose the loss).
        labels: [B, T], aligned with input_ids, IGNORE_INDEX where no loss is taken.
    Returns:
        (sum over positions with labels[:, 1:] != IGNORE_INDEX of -log p(label), count), 0-d tensors.
        The mean token loss is ``sum / count``.
    """
    target = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (target != IGNORE_INDEX).sum()
