"""AdaLoRA (Zhang et al. 2023), a baseline of the paper: SVD-shaped adapters whose ranks a budget prunes.

    y = x W0ᵀ + b + s · (dropout(x) (Q ⊙ Λ)ᵀ) Pᵀ,   Q = A: (r, d_in), Λ = E: (r, 1), P = B: (d_out, r),
    s = α / (r + 1e-5)                                                                   (AdaLoRA Eq. 3)

with r = init_r fixed for the whole run (pruning only zeroes entries of E, as peft does). The loss gets

    R = mean over every A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F   (not squared; weight orth_reg)

and after every optimizer step the `RankAllocator` scores each entry by I = |p · ∇p| with the EMAs

    Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|,   score = Ī · Ū              (Eq. 8-10)

scores triplet i as s(E_i) + mean_j s(A_ij) + mean_j s(B_ji) (Eq. 11), and keeps the `budget` best
triplets over all modules, zeroing E elsewhere. peft 0.21 (`tuners/adalora`) is the reference:
init E = 0, A, B ~ N(0, 0.02); the budget schedule, the `deltaT` masking, the final pattern fixed at
``total_step − tfinal`` and re-applied every later step are its, tested equal step by step.
Deviation: with ``init_r == target_r`` nothing is ever pruned (peft's ``kthvalue(k=0)`` raises).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fora.lora import LoRALinear

INIT_STD = 0.02  # peft's reset_lora_parameters: A, B ~ N(0, 0.02²)
RANK_EPS = 1e-5  # peft's `ranknum + 1e-5` divisor
PARTS = ("lora_A", "lora_E", "lora_B")


class AdaLoRALinear(LoRALinear):
    """A frozen linear layer with an AdaLoRA triplet adapter P Λ Q (peft's ``SVDLinear``).

    Args:
        base: the nn.Linear to wrap (a 4-bit base is not supported).
        rank: init_r, the number of triplets (fixed; pruned triplets have E_i = 0).
        alpha: α; the scale is α / (init_r + 1e-5) for the whole run.
        dropout, generator, dtype: as ``LoRALinear`` (the generator draws A, then B).
        ranknum: the divisor of the scale (peft's ``ranknum``), default ``rank``; an adapter sliced
            to its kept triplets keeps its init_r here, as peft does when it loads one.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 ranknum: int | None = None, rslora: bool = False, init: str = "standard") -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"AdaLoRALinear wraps a full-precision nn.Linear, got {type(base).__name__}; "
                            "load the base without --quantize for AdaLoRA")
        if rslora or init != "standard":  # inject_lora passes LoRALinear's options to every adapter
            raise ValueError(f"AdaLoRA has its own init and scale α / init_r (got rslora={rslora}, init={init!r}); "
                             "inject it with stiefel=False and rslora=False")
        super().__init__(base, rank, alpha, dropout=dropout, generator=generator, dtype=dtype)
        self.ranknum = rank if ranknum is None else int(ranknum)
        self.scale = self.alpha / (self.ranknum + RANK_EPS)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, dtype=dtype, device=self.lora_A.device))
        # Which triplets the allocator keeps (the export slices to them); E is zeroed elsewhere.
        self.kept = torch.ones(rank, dtype=torch.bool)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A, B ~ N(0, 0.02²) (A first), E = 0; a no-op on the meta device.

        Called by LoRALinear.__init__ before E exists; E starts at zero there.
        """
        if self.lora_A.is_meta:
            return
        src = generator.device if generator is not None else self.lora_A.device
        for p in (self.lora_A, self.lora_B):
            p.copy_(torch.empty(p.shape, device=src).normal_(0.0, INIT_STD, generator=generator))
        if hasattr(self, "lora_E"):
            self.lora_E.zero_()

    def euclidean_parameters(self, factor: str) -> list[nn.Parameter]:
        """E and B (AdaLoRA's triplets train under AdamW; A is ``factor("A")``)."""
        return [self.lora_E, self.lora_B]

    def delta_weight(self) -> Tensor:
        """ΔW = s · B (A ⊙ E), shape (d_out, d_in)."""
        return self.scale * (self.lora_B @ (self.lora_A * self.lora_E))

    @torch.no_grad()
    def apply_mask(self, keep: Tensor) -> None:
        """Zero E where ``keep`` (r,) bool is False and remember the kept triplets."""
        keep = keep.to(torch.bool).reshape(-1).cpu()
        self.lora_E.masked_fill_(~keep.to(self.lora_E.device)[:, None], 0.0)
        self.kept = keep.clone()

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_in) -> (..., d_out) in x's dtype; adapter math in the adapter dtype."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:
            return y
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(h.device.type):
            h = h.to(self.lora_A.dtype)
        u = F.linear(h, self.lora_A * self.lora_E)  # (..., r): the Λ-scaled right singular directions
        return y + (F.linear(u, self.lora_B) * self.scale).to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", adalora=True, kept={int(self.kept.sum())}"


def orthogonal_regularizer(modules: Iterable[AdaLoRALinear]) -> Tensor:
    """R = mean over all A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F (AdaLoRA Eq. 4; peft: not squared)."""
    terms = []
    for m in modules:
        for cov in (m.lora_A @ m.lora_A.mT, m.lora_B.mT @ m.lora_B):  # both (r, r)
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    if not terms:
        raise ValueError("orthogonal_regularizer got no AdaLoRA modules; inject with adapter=AdaLoRALinear first")
    return torch.stack(terms).mean()


class RankAllocator:
    """AdaLoRA's importance EMAs and global budget schedule, as a pure object (peft's ``RankAllocator``).

    ``update(step, triplets)`` reads the parameters and their gradients and returns the masks to
    apply (module path -> (r,) bool, True = kept) or None; it never touches the parameters. Steps
    count optimizer steps from 1. With T = total_step − tfinal:

    * step ≤ tinit: budget init_r · M, no masking; EMAs updated (as for every step < T).
    * tinit < step < T: budget ⌊(b0 − b1)(1 − (step − tinit) / (T − tinit))³ + b1⌋, masks every
      ``delta_t`` steps (b0 = Σ init ranks, b1 = target_r · M).
    * step = T: the final masks at b1 (EMAs not updated, then cleared); step > T: the same masks again.

    A triplet is pruned when its score is ≤ the (b0 − budget)-th smallest score (ties prune together).

    Args:
        init_ranks: module path -> init_r of that module.
        target_r: the average rank after budgeting (b1 = target_r · M).
        total_step, tinit, tfinal, delta_t: the schedule (tinit + tfinal < total_step).
        betas: (β1, β2) of the sensitivity and uncertainty EMAs.
    """

    def __init__(self, init_ranks: Mapping[str, int], *, target_r: int, total_step: int, tinit: int = 0,
                 tfinal: int = 0, delta_t: int = 1, betas: tuple[float, float] = (0.85, 0.85)) -> None:
        if not init_ranks:
            raise ValueError("RankAllocator got no modules; pass {module path: init_r}")
        check_schedule(max(init_ranks.values()), target_r, total_step, tinit, tfinal, delta_t, betas)
        self.names = sorted(init_ranks)
        self.init_bgt = sum(init_ranks.values())
        self.target_bgt = target_r * len(self.names)
        self.total_step, self.tinit, self.tfinal, self.delta_t = total_step, tinit, tfinal, delta_t
        self.beta1, self.beta2 = betas
        self.budget = self.init_bgt
        self.ipt: dict[str, Tensor] = {}  # Ī per parameter "<path>.lora_X"
        self.unc: dict[str, Tensor] = {}  # Ū per parameter
        self.pattern: dict[str, Tensor] | None = None  # the last masks (path -> (r,) bool)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, mask now) at ``step`` (peft's ``budget_schedule``)."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul ** 3) + self.target_bgt)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def update_importance(self, triplets: Mapping[str, tuple[Tensor, Tensor, Tensor]]) -> None:
        """Ī, Ū ← their EMAs of I = |p · ∇p| for every A, E, B (Eq. 8-9)."""
        for path, params in triplets.items():
            for part, p in zip(PARTS, params):
                if p.grad is None:
                    raise ValueError(f"{path}.{part} has no gradient; call RankAllocator.update after "
                                     "backward and the optimizer step, before zero_grad")
                key = f"{path}.{part}"
                ipt = (p * p.grad).abs().detach()
                ema = self.ipt.get(key, torch.zeros_like(p))
                unc = self.unc.get(key, torch.zeros_like(p))
                self.ipt[key] = self.beta1 * ema + (1 - self.beta1) * ipt
                self.unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - self.ipt[key]).abs()

    def triplet_scores(self) -> dict[str, Tensor]:
        """Eq. 11: s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), (r,) per module."""
        if not self.ipt:
            raise ValueError("RankAllocator has no importance scores yet: budgeting needs at least one "
                             "update before total_step - tfinal; raise total_step or lower tfinal")
        s = {key: self.ipt[key] * self.unc[key] for key in self.ipt}
        return {path: s[f"{path}.lora_E"].view(-1)
                + (s[f"{path}.lora_A"].mean(dim=1).view(-1) + s[f"{path}.lora_B"].mean(dim=0).view(-1))
                for path in self.names}

    def mask_to_budget(self, budget: int) -> dict[str, Tensor]:
        """Keep the ``budget`` best triplets over all modules (ties at the threshold are pruned)."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0:  # nothing to prune (peft's kthvalue(k=0) would raise)
            return {path: torch.ones(v.shape, dtype=torch.bool) for path, v in scores.items()}
        threshold = torch.kthvalue(torch.cat([scores[p] for p in self.names]), k=k)[0].item()
        return {path: (~(v <= threshold)).cpu() for path, v in scores.items()}

    def update(self, step: int, triplets: Mapping[str, tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor] | None:
        """One allocator step after optimizer step ``step`` (peft's ``update_and_allocate``).

        Args:
            step: optimizer steps done so far (1, 2, ...).
            triplets: module path -> (A (r, d_in), E (r, 1), B (d_out, r)), with their ``.grad``.
        Returns:
            the masks to apply now (path -> (r,) bool, True = kept), or None.
        """
        end = self.total_step - self.tfinal
        if step < end:
            self.update_importance(triplets)
            self.budget, mask_now = self.budget_schedule(step)
            if not mask_now:
                return None
            self.pattern = self.mask_to_budget(self.budget)
        elif step == end:
            self.budget = self.target_bgt
            self.pattern = self.mask_to_budget(self.budget)
            self.ipt, self.unc = {}, {}  # peft's reset_ipt: the pattern is final
        else:
            self.budget = self.target_bgt
        return self.pattern

    def rank_pattern(self) -> dict[str, list[bool]] | None:
        """The last masks as peft's ``rank_pattern`` values (path -> list of bools), or None."""
        return None if self.pattern is None else {p: m.tolist() for p, m in self.pattern.items()}

    def state_dict(self) -> dict:
        """The EMAs, the current budget and masks (tensors and ints: ``torch.load(weights_only=True)`` reads it)."""
        return {"budget": self.budget, "ipt": dict(self.ipt), "unc": dict(self.unc),
                "pattern": None if self.pattern is None else dict(self.pattern)}

    def load_state_dict(self, state: Mapping) -> None:
        """Inverse of ``state_dict``; the module paths must match."""
        if state["pattern"] is not None and sorted(state["pattern"]) != self.names:
            raise ValueError("RankAllocator state names other modules; resume with the same --model, "
                             "--targets and --method")
        self.budget = int(state["budget"])
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])
        self.pattern = None if state["pattern"] is None else dict(state["pattern"])


def check_schedule(init_r: int, target_r: int, total_step: int, tinit: int, tfinal: int, delta_t: int,
                   betas: tuple[float, float] = (0.85, 0.85)) -> None:
    """Raise a one-line ValueError naming the fix for an AdaLoRA schedule that cannot run."""
    if target_r < 1 or target_r > init_r:
        raise ValueError(f"AdaLoRA target rank {target_r} must be in [1, init_r = {init_r}]: "
                         "pass --target-r <= --init-r")
    if tinit < 0 or tfinal < 0 or delta_t < 1:
        raise ValueError(f"AdaLoRA needs --tinit >= 0, --tfinal >= 0 and --delta-t >= 1, got "
                         f"{tinit}, {tfinal} and {delta_t}")
    if tinit + tfinal >= total_step:
        raise ValueError(f"--tinit {tinit} + --tfinal {tfinal} >= {total_step} total steps leaves no budgeting "
                         "phase; lower --tinit / --tfinal or train more steps")
    if not all(0.0 < b < 1.0 for b in betas):
        raise ValueError(f"--adalora-betas must both lie in (0, 1), got {betas}")
