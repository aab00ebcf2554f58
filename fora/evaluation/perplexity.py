"""Sliding-window perplexity of a long text (the WikiText-2 protocol), each token counted once.

The text is tokenized once (BOS first when the checkpoint uses one). Tokens 1..N-1 are scored;
token 0 has no context. Windows of at most `window` tokens move by `stride`: each window scores
the next `stride` not-yet-scored tokens, conditioned on up to `window - stride` tokens before
them, so every scored token is counted in exactly one window and has at least
min(its position, window - stride) tokens of context. stride = window - 1 gives disjoint windows
that overlap by one token (the context of the first scored token); smaller strides give more
context per token at more compute.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fora.training.data import TokenizerLike
from fora.training.progress import tracked


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, first, end) per window: model input ids[begin:end], targets ids[first:end].

    The targets of all windows partition 1..n-1; end - begin <= window; first - begin >= 1.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens (context + target), got {window}")
    if not 1 <= stride < window:
        raise ValueError(f"stride must be in [1, window - 1] = [1, {window - 1}], got {stride}; every "
                         "scored token needs a token of context inside its window")
    first = 1
    while first < n:
        end = min(first + stride, n)
        yield max(0, end - window), first, end
        first = end


@torch.no_grad()
def perplexity(model: nn.Module, ids: Sequence[int], *, window: int = 1024, stride: int = 512,
               progress: bool = False) -> dict[str, Any]:
    """exp(mean over tokens 1..N-1 of -log p(token | its window's context)).

    Args:
        model: a fora CausalLM.
        ids: the token ids of the whole text [N], N >= 2.
        window: the most tokens fed to the model at once (<= its context length).
        stride: new tokens scored per window (1 <= stride < window).
    Returns:
        {"perplexity", "nll" (mean, nats), "tokens" (N - 1 scored), "windows"}.
    """
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    spans = list(windows(len(ids), window, stride))
    total, count = 0.0, 0
    for begin, first, end in tracked(spans, "perplexity", enabled=progress, unit="window", units="windows"):
        x = torch.tensor([list(ids[begin:end])], device=device)
        hidden = model.model(x)[0, first - begin - 1:end - begin - 1]  # positions predicting first..end-1
        logp = torch.log_softmax(model._head(hidden).float(), -1)
        targets = x[0, first - begin:]
        total -= float(logp.gather(1, targets[:, None]).double().sum())
        count += end - first
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": len(spans)}


def text_perplexity(model: nn.Module, tokenizer: TokenizerLike, path: str | os.PathLike[str], *,
                    window: int = 1024, stride: int = 512, progress: bool = False) -> dict[str, Any]:
    """`perplexity` of a UTF-8 text file (tokenized whole, BOS first when the checkpoint uses one)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist; pass a UTF-8 text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty; perplexity needs a text file with some words in it")
    ids = tokenizer.encode(text, bos=True)
    if len(ids) < 2:
        raise ValueError(f"{path} encodes to {len(ids)} token(s); perplexity needs at least 2")
    return {"file": str(path), **perplexity(model, ids, window=window, stride=stride, progress=progress)}
