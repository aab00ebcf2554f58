"""Log-likelihood of several continuations of one prefix, the prefix run once (the loglik protocol's core).

A multiple-choice record asks for log p(response_c | prompt) for every choice c, and the responses
share all but their last few tokens ("the correct answer is " + c). Scoring each (prompt, response)
pair as its own sequence runs the prompt once per choice. Here the prompt and the responses'
common leading tokens run once, left-padded, into a KV cache (`fora.models.generation.KVCache`);
each response's remaining tokens then run on that cache, which is rewound between choices. The
sums equal those of the separate sequences up to float rounding (tested against transformers on
whole sequences).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from fora.models.generation import KVCache, positions_from_mask
from fora.training.progress import tracked

Item = tuple[Sequence[int], Sequence[Sequence[int]]]  # (prefix ids, [continuation ids per choice])


def _common_length(conts: Sequence[Sequence[int]]) -> int:
    """Leading tokens shared by every continuation, leaving each at least one token of its own."""
    n = min(len(c) for c in conts) - 1
    for k in range(n):
        if any(c[k] != conts[0][k] for c in conts):
            return k
    return max(n, 0)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool, device: torch.device
             ) -> tuple[Tensor, Tensor]:
    """ids, mask [B, T]: rows padded with pad_id on the left (prefixes, generation) or right (scoring);
    an empty row is all padding."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(T - len(r), T) if left else slice(0, len(r))
        if r:
            ids[b, cols], mask[b, cols] = torch.tensor(list(r), dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def batch_order(order: Sequence[int], batch_size: int, desc: str, progress: bool) -> Iterator[Sequence[int]]:
    """Consecutive slices of `order`, `batch_size` at a time, the pass labelled `desc` in its progress
    (`fora.training.progress.tracked`: a bar on a terminal, plain log lines otherwise)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(order), batch_size)
    for s in tracked(starts, desc, enabled=progress):
        yield order[s:s + batch_size]


def pass_label(protocol: str, task: str | None = None, label: str | None = None) -> str:
    """What a scoring pass is called in its progress: "loglik cloze, before training (adapters off)"."""
    return " ".join(filter(None, [protocol, task])) + (f", {label}" if label else "")


@torch.no_grad()
def choice_logprobs(model: nn.Module, items: Sequence[Item], *, pad_id: int = 0, batch_size: int = 8,
                    progress: bool = False, desc: str = "loglik") -> list[list[float]]:
    """sum_t log p(cont_t | prefix, cont_<t) for every continuation of every (prefix, continuations) item.

    Args:
        model: a CausalLM (its `model` decoder and `_head`).
        items: (prefix ids, [continuation ids, ...]); every sequence non-empty.
        batch_size: items per forward (each item's prefix once, then one pass per choice index).
        desc: the pass's name in its progress (`pass_label`).
    Returns:
        per item, the summed log-probability of each continuation, in the given order.
    """
    for prefix, conts in items:
        if not prefix or not conts or not all(conts):
            raise ValueError("every item needs a non-empty prefix and non-empty continuations")
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    out: list[list[float]] = [[] for _ in items]
    for idx in batch_order(order, batch_size, desc, progress):
        common = [_common_length(items[i][1]) for i in idx]
        shared = [list(items[i][0]) + list(items[i][1][0][:c]) for i, c in zip(idx, common)]
        rests = [[list(cont[c:]) for cont in items[i][1]] for i, c in zip(idx, common)]
        ids, mask = pad_rows(shared, pad_id, True, device)  # (B, Tp), left-padded: every row ends at Tp - 1
        Tp = ids.shape[1]
        cache = KVCache(len(model.model.layers), Tp + max(len(r) for rs in rests for r in rs))
        hidden_p = model.model(ids, mask, positions_from_mask(mask), cache=cache)  # (B, Tp, H)
        vectors, targets, owners = [], [], []  # owners: (row, choice) of each scored token
        for b, (i, c) in enumerate(zip(idx, common)):
            for k, tok in enumerate(items[i][1][0][:c]):  # shared tokens, predicted inside the prefix pass
                vectors.append(hidden_p[b, Tp - c - 1 + k])
                targets.append(tok)
                owners.append((b, None))
        for j in range(max(len(rs) for rs in rests)):
            cont_ids, cont_mask = pad_rows([rs[j] if j < len(rs) else [] for rs in rests], pad_id, False, device)
            full_mask = torch.cat([mask, cont_mask], dim=1)
            positions = positions_from_mask(full_mask)[:, Tp:]
            hidden_c = model.model(cont_ids, full_mask, positions, cache=cache)  # (B, Tc, H)
            cache.rewind(Tp)
            for b, rs in enumerate(rests):
                if j < len(rs):
                    for k, tok in enumerate(rs[j]):  # the first is predicted by the prefix's last position
                        vectors.append(hidden_p[b, Tp - 1] if k == 0 else hidden_c[b, k - 1])
                        targets.append(tok)
                        owners.append((b, j))
        logp = torch.log_softmax(model._head(torch.stack(vectors)).float(), -1)
        picked = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].double().tolist()
        shared_sum = [0.0] * len(idx)
        sums = [[0.0] * len(rs) for rs in rests]
        for (b, j), v in zip(owners, picked):
            if j is None:
                shared_sum[b] += v
            else:
                sums[b][j] += v
        for b, i in enumerate(idx):
            out[i] = [shared_sum[b] + v for v in sums[b]]
    return out
