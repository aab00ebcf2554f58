"""Layer relevance by representation similarity (seed 003: layer-wise LoRA by CKA).

A block that barely changes the residual stream has an input and output of linear CKA close to 1;
the less similar they are, the more the block transforms its input and the more relevant it is
taken to be. :func:`fora.selection.select_layers` with ``by="cka"`` keeps the K lowest.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fora.fisher import decoder_layers, scoring_state
from fora.selection import validate_batches


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear centered kernel alignment between two representations of the same n samples.

    With column-centered X [n, d_x] and Y [n, d_y]:

        CKA(X, Y) = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F)        (Kornblith et al. 2019)

    in [0, 1], 1 for identical inputs, invariant to orthogonal transforms and isotropic scaling
    of either argument. Computed in float64; uses the n×n Gram form when n is smaller than the
    feature dimensions (same value, less work). Returns a 0-d float64 tensor.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs two 2-D [n, d] matrices over the same n samples, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 samples, got n={x.shape[0]}; use more sequences")
    x = x.double()
    y = y.double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T  # Gram form: ‖YᵀX‖² = <XXᵀ, YYᵀ>
        cross, nx, ny = (kx * ky).sum(), torch.linalg.norm(kx), torch.linalg.norm(ky)
    else:
        cross = torch.linalg.norm(y.T @ x).square()
        nx, ny = torch.linalg.norm(x.T @ x), torch.linalg.norm(y.T @ y)
    if nx == 0 or ny == 0:
        raise ValueError("linear CKA is undefined: one representation is identical across all samples "
                         "(zero variance after centering); use more varied calibration sequences")
    return cross / (nx * ny)


def last_token_index(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Index of the last real (mask = 1) token of each row; T-1 without a mask. Works for either padding side."""
    if attention_mask is None:
        return torch.full((shape[0],), shape[1] - 1, dtype=torch.long)
    mask = attention_mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have an all-zero attention_mask (no real token); drop them")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(1)


@torch.no_grad()
def cka_scores(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Linear CKA between the hidden state entering and leaving each block (lower = more relevant).

    Features: the residual stream at the last non-pad token of every sequence, from
    ``model.hidden_states(input_ids, attention_mask)`` (entering layer 0 ... leaving layer L-1,
    *before* the final norm), in float64, concatenated over all batches into [n, d] matrices.
    Note: the seed-003 reference code reads Hugging Face ``output_hidden_states``, whose last entry
    is *after* the final norm, so its score for the last layer also includes that norm; ours does not.

    Args:
        model: a fora.CausalLM (anything with ``hidden_states`` and ``model.model.layers``).
        batches: dicts with ``input_ids`` [B, T] and optionally ``attention_mask`` [B, T];
            ``labels`` are not used.

    Returns:
        Tensor[L] (float64, CPU): CKA(h_l, h_{l+1}) for each block l.
    """
    validate_batches(batches, labels=False)
    num_layers = len(decoder_layers(model))
    total = sum(int(b["input_ids"].shape[0]) for b in batches)
    if total < 2:
        raise ValueError(f"CKA needs at least 2 sequences in total, got {total}; add calibration sequences")
    device = next(model.parameters()).device
    feats: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]
    with scoring_state(model, []):  # eval mode, nothing trainable; both restored on exit
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)
            states = model.hidden_states(ids, mask)
            if len(states) != num_layers + 1:
                raise ValueError(f"model.hidden_states returned {len(states)} tensors, expected L+1 = "
                                 f"{num_layers + 1}; it must list the stream entering each block and leaving the last")
            last = last_token_index(mask, ids.shape).to(device)
            rows = torch.arange(ids.shape[0], device=device)
            for l, h in enumerate(states):
                feats[l].append(h[rows, last].double().cpu())  # [B, d]
    reps = [torch.cat(f) for f in feats]
    return torch.stack([linear_cka(reps[l], reps[l + 1]) for l in range(num_layers)])
