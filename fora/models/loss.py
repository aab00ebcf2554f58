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


# Rows of fp32 logits one chunk of the head loss may hold: 2**27 floats = 512 MiB for any vocabulary.
CHUNK_LOGITS = 2 ** 27


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into ``hidden[:, :-1]`` of the positions that carry a loss, and their targets.

    Args:
        labels: [B, T], aligned with input_ids. Position t of ``hidden`` predicts labels[:, t+1].
    Returns:
        (index [N] into the flattened [B * (T-1)] positions, target token ids [N]), on labels' device
        (pass CPU labels to find them without a device synchronisation).
    """
    target = labels[:, 1:].reshape(-1)
    index = (target != IGNORE_INDEX).nonzero().squeeze(1)
    return index, target.index_select(0, index)


class _HeadCrossEntropy(torch.autograd.Function):
    """Σ CE(softcap(h Wᵀ), y) over rows of h, chunked; the gradient is formed chunk by chunk in the
    forward, so the [N, V] logits (fp32 or not) never exist at once nor are kept for backward."""

    @staticmethod
    def forward(ctx, h, weight, target, softcap, rows, need_h, need_w):  # noqa: D401
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(h.dtype)
        for s in range(0, h.shape[0], rows):
            hc, yc = h[s:s + rows], target[s:s + rows]
            z = (hc @ w.mT).float()
            if softcap is not None:
                t = torch.tanh(z / softcap)
                z = t * softcap
            # log-sum-exp and softmax in place of the logits: one [rows, V] buffer, one exp pass
            z_y = z.gather(1, yc[:, None]).squeeze(1)
            m = z.amax(dim=-1, keepdim=True)
            e = z.sub_(m).exp_()
            s_sum = e.sum(dim=-1, keepdim=True)
            total += (s_sum.log() + m - z_y[:, None]).sum()
            if need_h or need_w:
                g = e.div_(s_sum)                                   # softmax
                g[torch.arange(len(yc), device=g.device), yc] -= 1.0
                if softcap is not None:
                    g *= 1.0 - t * t
                g = g.to(h.dtype)
                if need_h:
                    grad_h[s:s + rows] = g @ w
                if need_w:
                    grad_w += (g.mT @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
              softcap: float | None = None, chunk_logits: int = CHUNK_LOGITS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``causal_lm_loss(softcap(hidden @ weightᵀ), labels)`` without the full logits.

    Only the hidden states of positions whose shifted label is supervised go through the LM head,
    in chunks of at most ``chunk_logits`` logits; each chunk's softmax gradient is folded into
    the gradient of its hidden rows (and of ``weight`` if it requires grad) at once, so peak
    memory is one chunk of fp32 logits plus [N, Hd] rows instead of [B, T, V] logits and their
    fp32 copy. Same value and gradients as the full computation (up to summation order).

    Args:
        hidden: [B, T, Hd] final-normed hidden states, any float dtype.
        weight: [V, Hd] LM head (cast to hidden's dtype for the matmul; the loss is fp32).
        labels: [B, T] aligned with input_ids, IGNORE_INDEX where no loss is taken; on the CPU
            the positions are found without a device synchronisation.
        softcap: Gemma-2's final-logit soft-cap c (logits ← c · tanh(logits / c)), or None.
        chunk_logits: fp32 logits held at once (rows per chunk = chunk_logits // V).
    Returns:
        (summed token cross-entropy [fp32, hidden's device], supervised-token count [labels' device]).
    """
    index, target = supervised_positions(labels)
    B, T, H = hidden.shape
    h = hidden[:, :-1].reshape(B * (T - 1), H).index_select(0, index.to(hidden.device, non_blocking=True))
    target = target.to(hidden.device, non_blocking=True)
    rows = max(1, chunk_logits // weight.shape[0])
    need_h = torch.is_grad_enabled() and h.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    with torch.autocast(hidden.device.type, enabled=False):
        total = _HeadCrossEntropy.apply(h, weight, target, softcap, rows, need_h, need_w)
    return total, index.new_tensor(index.numel())
