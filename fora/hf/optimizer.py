"""One optimizer object for a Trainer: AdamW on A, g (and any other trainable tensor), Cayley-Adam on B.

``transformers.Trainer`` (and TRL's ``SFTTrainer``, a Trainer) calls ``optimizer.step()`` once per
optimizer step: after the last micro-batch of gradient accumulation and after clipping the
gradients of every parameter, B's included; then ``lr_scheduler.step()`` and ``zero_grad``. So
stepping Cayley-Adam inside ``step()`` is exactly once per optimizer step, on the accumulated and
clipped gradient. ``FoRAOptimizer`` *is* the AdamW (its ``param_groups`` are AdamW's), so a
schedule the Trainer builds on it moves AdamW's lr only; Cayley-Adam's lr is the authors' constant
cap (1e-3). ``state_dict()`` holds AdamW's state, Cayley-Adam's state and the trained split of each
folded g · A (see ``fora.hf.adapter``): the Trainer's ``optimizer.pt`` resumes bit-identically.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fora.cayley_adam import CAYLEY_BETAS
from fora.defaults import FORA
from fora.hf.adapter import fora_layers
from fora.optim import STIEFEL_LR, adamw, authors_cayley_adam

SPLIT_KEY = "fora_split"
CAYLEY_KEY = "cayley"


class FoRAOptimizer(torch.optim.AdamW):
    """AdamW on the Euclidean adapter tensors plus ``self.cayley``, a ``CayleyAdam`` on every B.

    Args:
        model: a peft model whose LoRA layers went through ``fora.hf.make_fora``.
        lr: AdamW's lr (the authors' 2e-4), the one a schedule drives.
        weight_decay, betas, eps: AdamW's (weight decay 0.01 as the authors; never on B).
        stiefel_lr: Cayley-Adam's constant cap α ≤ stiefel_lr (the authors' 1e-3).
        stiefel_betas, qr_every, iters: Cayley-Adam's (see ``fora.CayleyAdam``).
        adapter_name: the peft adapter to train.
    Raises:
        ValueError when the model has no FoRA layer (call ``make_fora`` first) or no trainable tensor.
    """

    def __init__(self, model: nn.Module, lr: float = FORA.lr, *, weight_decay: float = FORA.weight_decay,
                 betas: tuple[float, float] = FORA.adamw_betas, eps: float = FORA.eps,
                 stiefel_lr: float = STIEFEL_LR, stiefel_betas: tuple[float, float] = CAYLEY_BETAS,
                 qr_every: int = FORA.qr_every, iters: int = FORA.cayley_iters,
                 adapter_name: str = "default") -> None:
        layers = fora_layers(model, adapter_name)
        if not layers:
            raise ValueError("the model has no FoRA adapters; call fora.hf.make_fora(peft_model) (or "
                             "fora.hf.get_fora_model) before building FoRAOptimizer")
        self.fora_layers = layers
        self.adapter_name = adapter_name
        on_manifold = [m.lora_B[adapter_name].weight for m in layers.values()]
        ids = {id(p) for p in on_manifold}
        rest = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad and id(p) not in ids]
        frozen = [name for name, m in layers.items() if not m.lora_B[adapter_name].weight.requires_grad]
        if frozen or not rest:
            raise ValueError(f"the FoRA adapters are not trainable ({(frozen or list(layers))[0]}); call "
                             "model.train() / peft's set_adapter so lora_A, lora_B and the gates require grad")
        fused = adamw(rest, lr=lr).defaults["fused"]  # fora's rule for the fused kernel
        super().__init__(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
        self.cayley = authors_cayley_adam(on_manifold, stiefel_lr, betas=stiefel_betas, eps=eps,
                                          qr_every=qr_every, iters=iters)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """AdamW's step, then Cayley-Adam's: one optimizer step of every adapter tensor."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step()
        self.cayley.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.cayley.zero_grad(set_to_none=set_to_none)

    def _downs(self) -> list[tuple[str, nn.Module]]:
        return [(name, m.lora_A[self.adapter_name]) for name, m in self.fora_layers.items()]

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state dict plus ``"cayley"`` (Cayley-Adam's) and ``"fora_split"`` (each layer's A and g)."""
        out = super().state_dict()
        out[CAYLEY_KEY] = self.cayley.state_dict()
        downs = self._downs()
        out[SPLIT_KEY] = {"layers": [name for name, _ in downs],
                          "lora_A": [d.weight.detach().clone() for _, d in downs],
                          "gate": [d.gate.detach().clone() for _, d in downs]}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Both optimizers' states, then each layer's trained A and g where the model holds their g · A."""
        state_dict = dict(state_dict)
        cayley, split = state_dict.pop(CAYLEY_KEY, None), state_dict.pop(SPLIT_KEY, None)
        if cayley is None or split is None:
            raise ValueError("this optimizer state was not written by fora.hf.FoRAOptimizer (no 'cayley' / "
                             "'fora_split' entries); resume from a checkpoint of a FoRAOptimizer run")
        downs = self._downs()
        if list(split["layers"]) != [name for name, _ in downs]:
            raise ValueError(f"the optimizer state holds {len(split['layers'])} FoRA layers "
                             f"({list(split['layers'])[:2]}...), this model {len(downs)}; resume with the "
                             "same LoraConfig and make_fora")
        for (name, down), A, g in zip(downs, split["lora_A"], split["gate"]):
            A, g = A.to(down.weight.device, down.weight.dtype), g.to(down.gate.device, down.gate.dtype)
            if not torch.equal(g.to(A.dtype) * A, down.folded()):
                raise ValueError(f"the optimizer state belongs to other adapter weights: g · A differs at {name}; "
                                 "load the checkpoint's adapter first (Trainer.train(resume_from_checkpoint=...) "
                                 "does) or build a fresh FoRAOptimizer")
        super().load_state_dict(state_dict)
        self.cayley.load_state_dict(cayley)
        with torch.no_grad():
            for (_, down), A, g in zip(downs, split["lora_A"], split["gate"]):
                down.weight.copy_(A)
                down.gate.copy_(g)
