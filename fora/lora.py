"""LoRALinear: a frozen nn.Linear plus a rank-r update, written by hand (no parametrize).

    y = x W0ᵀ + b + g · s · (dropout(x) Aᵀ) Bᵀ,   A: (r, d_in), B: (d_out, r),
    s = α / r  (or α / √r with rsLoRA)                                        (Eq. 1)

g is FoRA's learnable scalar gate (init ``"stiefel_b"``: B column-orthonormal, A ~ N(0, 1/r),
g = 0, so ΔW = 0 at step 0); the other inits have no gate (g ≡ 1) and start from B = 0.

The dense ``W0 + s B A`` is never formed in ``forward``; it only exists after ``merge()``.
``weight`` / ``bias`` are the wrapped layer's own Parameter objects under their own names, so
the base model's state_dict keys are unchanged and the adapter adds ``lora_A`` / ``lora_B``.
A packed base (``fora.models.linear.is_packed_linear``: its weight is no Parameter but rebuilt in forward, such as
``fora.quant.nf4.NF4Linear`` for QLoRA / QFoRA) is kept whole as the child ``base_layer`` and called
in ``forward``; it cannot be merged in place (``save_merged`` writes the dequantized merge instead).
``disabled = True`` (see ``fora.inject.adapters_disabled``) skips the adapter path entirely, so the
module computes exactly the wrapped layer: the one "adapters off" switch every adapter type honours.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fora.models.linear import is_linear, is_packed_linear, linear_device
from fora.stiefel import random_stiefel

logger = logging.getLogger(__name__)

# standard: A Kaiming, B = 0. stiefel_b: FoRA (B on St(d_out, r), A ~ N(0, 1/r), gate g = 0).
# stiefel_a: the row-orthonormal-A ablation (A on St(d_in, r) transposed, B = 0).
INITS = ("standard", "stiefel_b", "stiefel_a")
STIEFEL_FACTOR = {"standard": None, "stiefel_b": "B", "stiefel_a": "A"}
STIEFEL_FACTORS = ("B", "A")  # FoRA's factor first, then the ablation's


class LoRALinear(nn.Module):
    """A frozen linear layer with a low-rank adapter (Eq. 1).

    Args:
        base: the nn.Linear (or packed linear) to wrap (may live on the meta device; init is then skipped).
        rank: r >= 1.
        alpha: α; the scale is α / r, or α / √r with ``rslora=True``.
        dropout: dropout probability on the adapter input (peft's ``lora_dropout``).
        rslora: use the rank-stabilised scale α / √r.
        init: "standard" (A Kaiming-uniform with a = √5 as in peft, B = 0); "stiefel_b" (FoRA: B =
            r orthonormal columns from a sign-fixed QR of a Gaussian, A ~ N(0, 1/r), a scalar gate
            ``lora_gate`` = 0); or "stiefel_a" (the ablation: A = r orthonormal rows, B = 0).
            All three give ΔW = 0 at init.
        generator: random source for A (its device is where A is drawn).
        dtype: dtype of A and B (fp32 by default, whatever the base dtype).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0,
                 rslora: bool = False, init: str = "standard",
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}; "
                            "target a linear projection such as q_proj")
        d_out, d_in = base.out_features, base.in_features
        if not (isinstance(rank, int) and rank > 0):
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}; pass e.g. rank=32")
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}: valid inits are {', '.join(INITS)}")
        factor = STIEFEL_FACTOR[init]
        if factor is not None and rank > (d_out if factor == "B" else d_in):
            n = d_out if factor == "B" else d_in
            raise ValueError(f"rank {rank} > {n} for a Stiefel {factor} of a {d_in} -> {d_out} layer "
                             f"(at most {n} orthonormal vectors of length {n}); lower the rank to at most {n}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = d_in, d_out
        self.rank, self.alpha, self.rslora, self.init = rank, float(alpha), rslora, init
        self.stiefel_factor = factor  # "B", "A" or None: the factor Cayley-Adam keeps orthonormal
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.merged = False
        self.disabled = False  # True: forward is the base layer alone (adapters_disabled)
        self.quantized = is_packed_linear(base)
        if self.quantized:
            self.base_layer = base
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        else:
            # The base layer's own Parameters, frozen: same objects, same state_dict names.
            self.weight = base.weight
            self.weight.requires_grad_(False)
            if base.bias is not None:
                self.bias = base.bias
                self.bias.requires_grad_(False)
            else:
                self.register_parameter("bias", None)
        device = linear_device(base)
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))
        if factor == "B":
            self.lora_gate = nn.Parameter(torch.zeros((), dtype=dtype, device=device))
        else:
            self.register_parameter("lora_gate", None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters(generator)
        self.train(base.training)  # inherit the wrapped layer's mode: no adapter dropout in eval

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the factors per ``self.init`` (ΔW = 0 after it); a no-op on the meta device."""
        if self.lora_A.is_meta:
            return
        src = generator.device if generator is not None else self.lora_A.device
        work = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        if self.init == "stiefel_b":
            B = random_stiefel(self.out_features, self.rank, generator=generator, dtype=work, device=src)
            A = torch.randn(self.rank, self.in_features, generator=generator, dtype=work, device=src)
            self.lora_B.copy_(B)
            self.lora_A.copy_(A / math.sqrt(self.rank))  # N(0, 1/r)
            self.lora_gate.zero_()
            return
        if self.init == "stiefel_a":
            A = random_stiefel(self.in_features, self.rank, generator=generator, dtype=work, device=src).mT
        else:
            A = torch.empty(self.rank, self.in_features, dtype=torch.float32, device=src)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A.copy_(A)
        self.lora_B.zero_()

    def stiefel_parameter(self) -> nn.Parameter | None:
        """The factor on the Stiefel manifold: B (FoRA), A (the ablation) or None (plain LoRA)."""
        return None if self.stiefel_factor is None else self.factor(self.stiefel_factor)

    def factor(self, name: str) -> nn.Parameter:
        """The factor ``name``: "B" (d_out, r) or "A" (r, d_in)."""
        return self.lora_B if name == "B" else self.lora_A

    def euclidean_parameters(self, factor: str) -> list[nn.Parameter]:
        """What AdamW trains when ``factor`` is on the manifold: the other factor, then the gate."""
        other = self.lora_A if factor == "B" else self.lora_B
        return [other] + ([self.lora_gate] if self.lora_gate is not None else [])

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of the adapter (subclasses add theirs to ``euclidean_parameters``)."""
        return list(dict.fromkeys([self.lora_A, self.lora_B, *self.euclidean_parameters("B")]))

    def gate(self) -> float:
        """g as a number (1.0 without a gate): ΔW = g · s · B A."""
        return 1.0 if self.lora_gate is None else float(self.lora_gate.detach())

    def delta_weight(self) -> Tensor:
        """ΔW = g · s · B A, shape (d_out, d_in), in the adapter dtype."""
        delta = self.scale * (self.lora_B @ self.lora_A)
        return delta if self.lora_gate is None else self.lora_gate * delta

    def merged_weight(self, w0: Tensor) -> Tensor:
        """W0 + g s B A for a given W0 [d_out, d_in], in float32 (for exports; the module is unchanged)."""
        return w0.float() + self.delta_weight().detach().float().to(w0.device)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + g s B A in the base dtype; forward then skips the adapter path."""
        self._refuse_quantized("merge")
        if self.merged:
            logger.warning("LoRALinear.merge(): already merged, nothing to do")
            return
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − g s B A: undo ``merge()`` (exact up to rounding in the base dtype)."""
        self._refuse_quantized("unmerge")
        if not self.merged:
            logger.warning("LoRALinear.unmerge(): not merged, nothing to do")
            return
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False

    def _refuse_quantized(self, what: str) -> None:
        if self.quantized:
            raise ValueError(f"cannot {what} an adapter into a packed (4-bit) base in place; write the merged "
                             "model with fora.formats.peft_io.save_merged (dequantized W0 + s B A), "
                             "or load the base unquantized")

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out) in x's dtype; adapter math in the adapter dtype."""
        if self.quantized:  # the packed layer's output is left as it is (Fisher's hooks may see it)
            y = self.base_layer(x)
            return y if self.merged or self.disabled else y + self._scaled_up(self._down(x)).to(y.dtype)
        x2 = x.reshape(-1, self.in_features)  # (N, d_in)
        y = F.linear(x2, self.weight, self.bias)  # (N, d_out), a fresh tensor that only we hold
        if not (self.merged or self.disabled):
            u = self._down(x2)  # (N, r), gated
            if u.dtype == y.dtype:
                # y += s · u Bᵀ inside the GEMM (beta = 1, alpha = s): no (N, d_out) temporary for
                # the product, its scaling or the sum, and in backward s scales (N, r)-sized
                # gradients only. In place is safe: linear's backward never reads its output.
                y.addmm_(u, self.lora_B.mT.to(u.dtype), alpha=self.scale)
            else:  # a bf16 base with fp32 adapters and no autocast
                y = y + self._scaled_up(u).to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _down(self, x: Tensor) -> Tensor:
        """u = dropout(x) Aᵀ (times g where there is a gate), in the adapter dtype unless autocast casts both operands itself."""
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_A.dtype)
        u = F.linear(h, self.lora_A)
        return u if self.lora_gate is None else u * self.lora_gate.to(u.dtype)  # g on the (N, r) side

    def _scaled_up(self, u: Tensor) -> Tensor:
        """s · u Bᵀ: Eq. 1's adapter term from the down-projection u."""
        return F.linear(u, self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, init={self.init}, merged={self.merged}"
                + (", disabled=True" if self.disabled else ""))
