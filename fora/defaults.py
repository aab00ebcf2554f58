"""FoRA's settings, each in one place with where it comes from.

Every function and script that has one of these as a default reads it from ``FORA``:
``LoRALinear`` / ``inject_lora`` (rank, α, targets), ``CayleyAdam`` and ``fora.optim`` (the
Stiefel step), ``TrainConfig`` (the run), ``fora.hf.FoRAOptimizer``. ``SOURCES`` says for each field
whether the paper states it, the authors' code sets it, or fora decided it (and why).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

PAPER, AUTHORS, FORA_DECISION = "paper", "authors' code", "fora"


@dataclass(frozen=True)
class Defaults:
    """The method's defaults (read ``FORA``; ``SOURCES[name]`` gives each one's origin)."""

    rank: int = 32
    alpha_per_rank: float = 2.0          # α = 2 r (α = 64 at r = 32)
    k_fraction: float = 0.5              # K = L / 2 adapted layers, rounded down, at least 1
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    lora_dropout: float = 0.05
    fisher_batches: int = 128            # N of Eq. 2
    lr: float = 2e-4                     # AdamW on A and the gate g, on the warm-up / decay schedule
    weight_decay: float = 0.01           # AdamW only: decay would move B off the manifold
    adamw_betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    stiefel_lr: float = 1e-3             # Cayley-Adam's lr: α = min(lr, 1/‖W‖₁), held constant
    cayley_betas: tuple[float, float] = (0.9, 0.99)
    qr_every: int = 100                  # T: re-orthonormalise B by QR every T-th step
    cayley_iters: int = 5                # fixed-point sweeps of Eq. 6
    step_cap: str = "l1"                 # α = min(lr, 1/‖W‖₁)
    max_grad_norm: float = 1.0
    cutoff_len: int = 256
    epochs: int = 3


FORA = Defaults()

SOURCES: dict[str, str] = {
    "rank": f"{PAPER}: r = 32",
    "alpha_per_rank": f"{FORA_DECISION}: LLM-Adapters' commonsense recipe (r = 32, α = 64); the paper gives no α",
    "k_fraction": f"{PAPER}: K = L / 2",
    "targets": f"{PAPER}: q, k, v, up, down",
    "lora_dropout": f"{FORA_DECISION}: 0.05, LLM-Adapters' commonsense recipe",
    "fisher_batches": f"{PAPER} (Table 10) and {AUTHORS}: N = 128",
    "lr": f"{AUTHORS}: AdamW lr 2e-4 with the trainer's schedule",
    "weight_decay": f"{AUTHORS}: torch's AdamW weight decay 0.01",
    "adamw_betas": f"{AUTHORS}: torch's AdamW defaults",
    "eps": f"{PAPER}: ε = 1e-8 (Cayley-Adam; torch's AdamW default too)",
    "stiefel_lr": f"{AUTHORS}: Cayley-Adam lr 1e-3, constant (no warm-up, no decay)",
    "cayley_betas": f"{PAPER}: β = (0.9, 0.99)",
    "qr_every": f"{AUTHORS}: T = 100",
    "cayley_iters": f"{AUTHORS}: 5 fixed-point sweeps",
    "step_cap": f"{PAPER} (the algorithm) and {AUTHORS}: α = min(lr, 1/‖W‖₁)",
    "max_grad_norm": f"{FORA_DECISION}: clip at 1.0, transformers Trainer's default",
    "cutoff_len": f"{PAPER}: sequence length 256",
    "epochs": f"{PAPER}: 3 epochs",
}


def default_k(num_layers: int) -> int:
    """K = ⌊L · k_fraction⌋, at least 1 (Gemma-3-1B: 26 layers -> 13)."""
    return max(1, int(num_layers * FORA.k_fraction))


def sources_table() -> str:
    """The defaults as a markdown table: field, value, source (docs/method.md shows it)."""
    def shown(v: object) -> str:
        return f"{v:g}" if isinstance(v, float) else ", ".join(map(shown, v)) if isinstance(v, tuple) else str(v)
    rows = [f"| `{f.name}` | {shown(getattr(FORA, f.name))} | {SOURCES[f.name]} |" for f in fields(FORA)]
    return "\n".join(["| setting | default | source |", "|---|---|---|", *rows])
