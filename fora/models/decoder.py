"""One decoder for LLaMA-2/3.x, Qwen3, Gemma-2 and Gemma-3 text models.

Families differ only through `ModelConfig` fields (see fora/models/config.py); nothing here looks at a
model's name. Module paths equal the checkpoint tensor names: `model.embed_tokens`,
`model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.up_proj`, `model.norm`, `lm_head`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fora.models.config import SLIDING, ModelConfig
from fora.models.generation import KVCache, greedy_generate
from fora.models.layers import DecoderLayer, RMSNorm, causal_mask
from fora.models.loss import head_loss
from fora.models.rope import RotaryEmbedding


class DecoderModel(nn.Module):
    """Embedding, the stack of layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        # Plain attributes, not buffers: recomputed from the config, never loaded (fora/models/rope.py).
        self.rotary_emb = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.rotary_emb_local = (self.rotary_emb if cfg.rope_local == cfg.rope
                                 else RotaryEmbedding(cfg.rope_local, cfg.head_dim))

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings [B, T, Hd]; Gemma scales them by sqrt(Hd) rounded to the compute dtype."""
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            # fp32 scalar first, then the compute dtype, as transformers does (bf16: 1152 -> 34.0).
            x = x * torch.tensor(self.config.hidden_size ** 0.5, device=x.device).to(x.dtype)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, *, grad_from_layer: int = 0,
                collect: list[Tensor] | None = None, cache: KVCache | None = None) -> Tensor:
        """Final-normed hidden states [B, T, Hd]. `collect`, if given, receives the residual stream
        entering every layer and leaving the last one (L + 1 tensors, before the final norm).
        With a `cache` (KVCache) the T tokens follow the cache's `length` cached positions:
        `attention_mask` then covers all length + T positions and the cache advances by T."""
        cfg = self.config
        if not 0 <= grad_from_layer <= cfg.num_hidden_layers:
            raise ValueError(f"grad_from_layer={grad_from_layer} is outside [0, {cfg.num_hidden_layers}]; "
                             "pass the index of the lowest layer that needs gradients")
        B, T = input_ids.shape
        device = input_ids.device
        past = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]  # (1, T), broadcast
        dtype = self.embed_tokens.weight.dtype
        rope = {lt: (self.rotary_emb_local if lt == SLIDING else self.rotary_emb)(position_ids, dtype)
                for lt in set(cfg.layer_types)}
        masks = (self._masks(T, attention_mask, dtype, device) if cache is None
                 else cache.masks(cfg, T, attention_mask, dtype, device))

        frozen = torch.no_grad() if grad_from_layer > 0 else contextlib.nullcontext()
        with frozen:
            x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if collect is not None:
                collect.append(x)
            cos, sin = rope[layer.layer_type]
            with torch.no_grad() if i < grad_from_layer else contextlib.nullcontext():
                x = layer(x, cos, sin, masks[layer.layer_type], cache)
        if collect is not None:
            collect.append(x)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def _masks(self, T: int, attention_mask: Tensor | None, dtype: torch.dtype,
               device: torch.device) -> dict[str, Tensor | None]:
        """Per layer type: None (plain causal, SDPA's fast path) or an additive mask."""
        keys = _key_mask(attention_mask)
        full = None if keys is None else causal_mask(T, None, keys, dtype, device)
        window = self.config.sliding_window
        if window is None or window >= T:
            sliding = full  # the window hides nothing at this length
        else:
            sliding = causal_mask(T, window, keys, dtype, device)
        return {"full_attention": full, SLIDING: sliding}


def _key_mask(attention_mask: Tensor | None) -> Tensor | None:
    """The padding mask, or None when causality alone already hides every padded key.

    With no padding, or padding only on the right, a real token never sees a pad key (pads come
    after it), so logits at real positions are those of the full masked computation and SDPA can
    take its causal fast path. Outputs at right-padded positions then differ from transformers'
    (they attend to earlier pads too); they are meaningless either way.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq] with 1 for tokens and 0 for padding, "
                         f"got shape {tuple(attention_mask.shape)}")
    m = attention_mask.bool()
    if bool((m[:, 1:] <= m[:, :-1]).all()):  # every row is 1...1 0...0
        return None
    return m


class CausalLM(nn.Module):
    """Decoder plus LM head. `lm_head.weight` is `model.embed_tokens.weight` when tied."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head share the embedding matrix (needed again after `load_state_dict(assign=True)`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attn_implementation(self, impl: str) -> "CausalLM":
        """"sdpa" (default, fused kernels) or "eager" (explicit scores; bit-identical to
        transformers' eager attention, slower and O(T^2) memory)."""
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"unknown attention implementation {impl!r}; use 'sdpa' or 'eager'")
        for layer in self.model.layers:
            layer.self_attn.impl = impl
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, *, grad_from_layer: int = 0) -> Tensor:
        """Logits [B, T, V] in the compute dtype.

        Args:
            input_ids: [B, T] token ids.
            attention_mask: [B, T], 1 for tokens, 0 for padding (left or right). Positions stay
                arange(T) unless `position_ids` is given, as in transformers' plain forward.
            position_ids: [B, T] or [1, T].
            grad_from_layer: j > 0 runs the embedding and layers < j under no_grad, so backward
                stops at layer j (the lowest adapted layer).
        """
        x = self.model(input_ids, attention_mask, position_ids, grad_from_layer=grad_from_layer)
        return self._head(x)

    def loss(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
             position_ids: Tensor | None = None, *, grad_from_layer: int = 0) -> tuple[Tensor, Tensor]:
        """(summed token cross-entropy, supervised-token count) as `causal_lm_loss(self(...), labels)`,
        with the LM head applied only at supervised positions and the logits chunked (`head_loss`).

        Args: as `forward`, plus labels [B, T] aligned with input_ids (IGNORE_INDEX: no loss).
        """
        x = self.model(input_ids, attention_mask, position_ids, grad_from_layer=grad_from_layer)
        return head_loss(x, self.lm_head.weight, labels, softcap=self.config.final_logit_softcapping)

    def _head(self, x: Tensor) -> Tensor:
        logits = self.lm_head(x)
        cap = self.config.final_logit_softcapping
        if cap is not None:  # Gemma-2: tanh soft-cap of the final logits
            logits = torch.tanh(logits / cap) * cap
        return logits

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 max_new_tokens: int = 32, eos_id: int | Sequence[int] | None = None,
                 pad_id: int = 0, use_cache: bool = True) -> Tensor:
        """Greedy decoding with a KV cache; equals transformers' `generate(do_sample=False)`.

        Args:
            input_ids: [B, T] prompts, LEFT-padded (the last column holds real tokens).
            attention_mask: [B, T], 1 for tokens, 0 for padding; None when nothing is padded.
                Positions count real tokens only, so padding does not shift RoPE.
            max_new_tokens: at most this many tokens per row.
            eos_id: stop id(s); a row that emitted one gets `pad_id` from then on, and decoding
                ends when every row has stopped.
            use_cache: False re-runs the whole prefix at every step (the cache-free reference).
        Returns:
            The new tokens [B, n], n <= max_new_tokens (the prompt is not repeated).
        """
        return greedy_generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               eos_id=eos_id, pad_id=pad_id, use_cache=use_cache)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None) -> list[Tensor]:
        """Residual stream [B, T, Hd] entering layer 0, ..., leaving layer L-1 (L + 1 tensors,
        before the final norm), e.g. for CKA between a layer's input and output."""
        out: list[Tensor] = []
        self.model(input_ids, attention_mask, position_ids, collect=out)
        return out


class CausalLMLoss(nn.Module):
    """`CausalLM.loss` as a module's forward, for wrappers that call only `forward`: under
    `DistributedDataParallel(CausalLMLoss(model))` the step keeps the loss at supervised positions
    (no [B, T, V] logits) and DDP still sees one forward per backward."""

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None, *,
                grad_from_layer: int = 0) -> tuple[Tensor, Tensor]:
        return self.lm.loss(input_ids, labels, attention_mask, grad_from_layer=grad_from_layer)
