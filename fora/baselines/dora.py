"""DoRALinear: weight-decomposed low-rank adaptation (DoRA, Liu et al. 2024), a baseline of the paper.

    W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_c

``m`` (d_out,) is a trained magnitude per output row, initialised to ‖W0‖_c; ``‖·‖_c`` is the L2
norm of each output row over the input dimension (peft's ``weight_norm``, ``dim=1`` of the
[d_out, d_in] weight). As the DoRA paper (§4.3) recommends and peft does, the norm is treated as a
constant: it is recomputed every forward but detached, so no gradient flows through it.
The forward never forms W'; with g = m / ‖W0 + s B A‖_c (detached norm) it computes

    y = x W0ᵀ + b + (g − 1) ⊙ (x̃ W0ᵀ) + g ⊙ s (x̃ Aᵀ) Bᵀ,   x̃ = dropout(x)

exactly as peft 0.21 (``x̃ = x`` without dropout or in eval mode), so a saved adapter
(``use_dora: true``, tensors ``lora_A`` / ``lora_B`` / ``lora_magnitude_vector``) loads in peft
with equal outputs. The base may be an ``NF4Linear`` (QDoRA): W0 is then its dequantized weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fora.lora import LoRALinear


class DoRALinear(LoRALinear):
    """A frozen linear layer with a DoRA adapter (LoRALinear's A, B, scale, plus magnitude m).

    Args: as ``LoRALinear``; m is set to ‖W0‖_c after A and B are drawn (B = 0, so W' = W0).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, **kwargs) -> None:
        if kwargs.get("init") == "stiefel_b":
            raise ValueError("DoRA has no gate and keeps B = 0 at init: FoRA's gated Stiefel B (init='stiefel_b') "
                             "does not apply; inject DoRA with stiefel=False (or stiefel_factor='A')")
        super().__init__(base, rank, alpha, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(
            torch.ones(self.out_features, dtype=self.lora_A.dtype, device=self.lora_A.device))
        self._merge_norm: Tensor | None = None
        self.reset_magnitude()

    def euclidean_parameters(self, factor: str) -> list[nn.Parameter]:
        """LoRALinear's, then the magnitude m."""
        return super().euclidean_parameters(factor) + [self.lora_magnitude_vector]

    def base_weight(self) -> Tensor:
        """W0 [d_out, d_in] in the adapter dtype (dequantized for a 4-bit base)."""
        w0 = self.base_layer.dequantized_weight() if self.quantized else self.weight
        return w0.to(self.lora_A.dtype)

    def weight_norm(self) -> Tensor:
        """‖W0 + s B A‖_c (d_out,), detached (DoRA §4.3)."""
        with torch.no_grad():
            return torch.linalg.norm(self.base_weight() + self.delta_weight(), dim=1)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m ← ‖W0 + s B A‖_c (= ‖W0‖_c right after init); a no-op on the meta device."""
        if not self.lora_A.is_meta:
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def merged_weight(self, w0: Tensor) -> Tensor:
        """W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖_c for a given W0 (float64 for a float64 W0, else float32)."""
        dt = torch.float64 if w0.dtype == torch.float64 else torch.float32
        v = w0.to(dt) + self.delta_weight().detach().to(dt).to(w0.device)
        m = self.lora_magnitude_vector.detach().to(dt).to(w0.device)
        return (m / torch.linalg.norm(v, dim=1))[:, None] * v

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W' in the base dtype; forward then skips the adapter path."""
        self._refuse_quantized("merge")
        if self.merged:
            return
        self._merge_norm = self.weight_norm()
        self.weight.copy_(self.merged_weight(self.weight).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W' ‖W0 + s B A‖_c / m − s B A (exact up to rounding in the base dtype)."""
        self._refuse_quantized("unmerge")
        if not self.merged:
            return
        g = (self.lora_magnitude_vector / self._merge_norm)[:, None]
        self.weight.copy_((self.weight.float() / g - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out) in x's dtype; adapter math in the adapter dtype."""
        y = self.base_layer(x) if self.quantized else F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:  # disabled: the base alone, not (m / ‖W0‖_c) ⊙ x W0ᵀ
            return y
        w0 = self.base_weight()
        g = self.lora_magnitude_vector / self.weight_norm()
        dropped = not isinstance(self.lora_dropout, nn.Identity) and self.training
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        bias = self.base_layer.bias if self.quantized else self.bias
        if dropped:
            base = F.linear(h, w0)
        else:
            base = y.to(h.dtype) - (bias.to(h.dtype) if bias is not None else 0)
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        return y + ((g - 1) * base + g * lora).to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
