"""Greedy decoding with a key/value cache, batched with left padding.

The cache keeps, per layer, the rotated keys and the values of every position seen so far, so a
decoding step feeds one token per row instead of the whole prefix. Sliding-window layers keep the
full history too and hide keys outside the window with the mask (`causal_mask(..., past=...)`), so
a sequence may grow past the window. Positions follow transformers' `generate`: the cumulative
count of real tokens minus one, so a left-padded row starts at position 0 like an unpadded one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fora.models.config import SLIDING, ModelConfig
from fora.models.layers import causal_mask


class KVCache:
    """Keys and values [B, K, S, D] per layer, preallocated for `capacity` positions.

    `DecoderModel.forward(..., cache=c)` appends the T new positions of every layer and then calls
    `advance(T)`; `length` is the number of positions stored (the `past` of the next call).
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity, self.length = capacity, 0
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, K, T, D] at positions length..length+T; return all [B, K, length+T, D]."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} requested; create it "
                             "with a capacity of prompt length + max_new_tokens")
        if self._k[layer_idx] is None:
            B, K, _, D = k.shape
            self._k[layer_idx] = k.new_empty(B, K, self.capacity, D)
            self._v[layer_idx] = v.new_empty(B, K, self.capacity, D)
        ck, cv = self._k[layer_idx], self._v[layer_idx]
        ck[:, :, self.length:end] = k
        cv[:, :, self.length:end] = v
        return ck[:, :, :end], cv[:, :, :end]

    def advance(self, T: int) -> None:
        self.length += T

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (they are overwritten by the next call): one
        cached prefix can then be continued several ways."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a KV cache of {self.length} positions to {length}")
        self.length = length

    def masks(self, cfg: ModelConfig, T: int, attention_mask: Tensor | None, dtype: torch.dtype,
              device: torch.device) -> dict[str, Tensor]:
        """Additive masks [B|1, 1, T, length+T] per layer type for T queries after `length` keys.

        Args:
            attention_mask: [B, length+T] over all positions (cached and new), 1 = token, 0 = pad;
                None when nothing is padded.
        """
        past = self.length
        if attention_mask is not None and attention_mask.shape[-1] != past + T:
            raise ValueError(f"with a KV cache attention_mask must cover the {past} cached and {T} "
                             f"new positions, got shape {tuple(attention_mask.shape)}")
        full = causal_mask(T, None, attention_mask, dtype, device, past=past)
        window = cfg.sliding_window
        sliding = full if window is None or window >= past + T else causal_mask(
            T, window, attention_mask, dtype, device, past=past)
        return {"full_attention": full, SLIDING: sliding}


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids [B, T]: running count of real tokens minus one; pads get 1, as transformers."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    max_new_tokens: int, eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
                    use_cache: bool = True) -> Tensor:
    """Greedy (argmax) continuation of a left-padded batch; see `CausalLM.generate`.

    `use_cache=False` re-runs the whole sequence at every step (the cache-free reference).
    Returns the new tokens [B, n] (n <= max_new_tokens; fewer when every row has ended).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("a row ends in padding; pad prompts on the LEFT for generation")
    stops = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id),
                         dtype=torch.long, device=device)
    mask = attention_mask.long()
    cache = KVCache(len(model.model.layers), T + max_new_tokens) if use_cache else None
    running = torch.ones(B, dtype=torch.bool, device=device)
    seq, step_ids, new = input_ids, input_ids, []
    for _ in range(max_new_tokens):
        positions = positions_from_mask(mask)
        if cache is not None:
            positions = positions[:, -step_ids.shape[1]:]
            # no padding: the cache needs no key mask at all (a plain causal mask)
            x = model.model(step_ids, mask if bool((mask == 0).any()) else None, positions, cache=cache)
        else:
            x = model.model(seq, mask, positions)
        next_ids = model._head(x[:, -1]).argmax(-1)  # (B,)
        next_ids = torch.where(running, next_ids, torch.full_like(next_ids, pad_id))
        new.append(next_ids)
        running = running & ~torch.isin(next_ids, stops)
        if not bool(running.any()):
            break
        step_ids = next_ids[:, None]
        seq = torch.cat([seq, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return torch.stack(new, dim=1)
