"""What a trained adapter did: spectra of ΔW = g·s·B·A, effective rank, Stiefel error, output drift.

Per adapted module: the singular values of ΔW, computed without forming the dense
(d_out x d_in) matrix (Aᵀ = Q R, so B A = (B Rᵀ) Qᵀ has the singular values of the small
d_out x r matrix B Rᵀ); the entropy effective rank (Roy & Vetterli 2007) and its ratio to r; ‖ΔW‖_F;
the Stiefel factor's max |XᵀX − I|. By Lemma 1, when B has orthonormal columns the singular values
of ΔW / (g s) are those of A (for the ablation, with A's rows orthonormal, those of B).

A DoRA module's update W′ − W0 = (g − 1) ⊙ W0 + g ⊙ s B A (g = m / ‖W0 + s B A‖_c, per output row)
is not of rank r, so its singular values come from the dense update (min(d_out, d_in) of them; its
erank / r may exceed 1).

Output drift: KL(base ‖ tuned) of the next-token distributions on held-out text, base = the same
model under ``adapters_disabled`` (every adapter computes its frozen layer alone), averaged over tokens.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fora.baselines.adalora import AdaLoRALinear
from fora.baselines.dora import DoRALinear
from fora.inject import adapters_disabled, lora_modules
from fora.lora import LoRALinear
from fora.models.paths import layer_index
from fora.stiefel import effective_rank, stiefel_error


def delta_singular_values(A: Tensor, B: Tensor, scale: float = 1.0) -> Tensor:
    """Singular values of s·B·A (descending, float64) without forming the dense product.

    Args:
        A: (r, d_in) down-projection.
        B: (d_out, r) up-projection.
        scale: s (α / r).
    Returns:
        (r,) singular values; the nonzero ones are exactly those of s·B·A.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A must be (r, d_in) and B (d_out, r), got A {tuple(A.shape)}, B {tuple(B.shape)}")
    _, R = torch.linalg.qr(A.detach().to(torch.float64).mT)  # Aᵀ = Q R, Q (d_in, r) orthonormal columns
    return abs(scale) * torch.linalg.svdvals(B.detach().to(torch.float64) @ R.mT)


def dora_update_singular_values(module: DoRALinear) -> Tensor:
    """Singular values of DoRA's update W′ − W0 (descending, float64), from the dense difference."""
    with torch.no_grad():
        w0 = module.base_weight().to(torch.float64)
        return torch.linalg.svdvals(module.merged_weight(w0) - w0)


def module_diagnostics(name: str, module: LoRALinear) -> dict[str, Any]:
    """One row: singular values of the update (ΔW = g s B A, or DoRA's W′ − W0), erank, erank / r,
    its Frobenius norm, and the Stiefel factor's distance from the manifold (``factor_error``)."""
    if isinstance(module, DoRALinear):
        sigma = dora_update_singular_values(module)
    elif isinstance(module, AdaLoRALinear):  # ΔW = s B (A ⊙ E): E scales the rows of A
        sigma = delta_singular_values(module.lora_A * module.lora_E, module.lora_B, module.scale)
    else:
        sigma = delta_singular_values(module.lora_A, module.lora_B, module.scale * module.gate())
    erank = effective_rank(torch.diag(sigma)) if sigma.numel() else 0.0
    return {"module": name, "layer": layer_index(name), "rank": module.rank, "scale": module.scale,
            "singular_values": sigma.tolist(), "effective_rank": erank,
            "effective_rank_ratio": erank / module.rank, "fro_norm": float(sigma.norm()),
            "stiefel_error": factor_error(module)}


def factor_error(module: LoRALinear) -> float:
    """max |XᵀX − I| of the module's Stiefel factor (B's columns, or A's rows for the ablation); for
    an adapter loaded from a file, whose factor is not recorded, the smaller of the two."""
    err_b, err_a = stiefel_error(module.lora_B), stiefel_error(module.lora_A, rows=True)
    return {"B": err_b, "A": err_a}.get(module.stiefel_factor, min(err_b, err_a))


def adapter_diagnostics(model: nn.Module) -> list[dict[str, Any]]:
    """`module_diagnostics` for every LoRALinear of `model`, in module order."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model carries no LoRA adapters; load one first "
                         "(fora.formats.peft_io.load_adapter) or inject and train one")
    return [module_diagnostics(name, m) for name, m in modules.items()]


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-layer and overall summaries of `adapter_diagnostics` rows.

    Effective-rank ratios are averaged over modules (modules with ΔW = 0 count as 0); Frobenius
    norms combine as sqrt(Σ ‖ΔW‖²); Stiefel errors take the max.
    """
    if not rows:
        raise ValueError("no diagnostics rows to summarize")

    def combine(group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"modules": len(group),
                "effective_rank_ratio": sum(r["effective_rank_ratio"] for r in group) / len(group),
                "effective_rank": sum(r["effective_rank"] for r in group) / len(group),
                "fro_norm": math.sqrt(sum(r["fro_norm"] ** 2 for r in group)),
                "stiefel_error": max(r["stiefel_error"] for r in group)}

    layers = sorted({r["layer"] for r in rows})
    return {"layers": {str(i): combine([r for r in rows if r["layer"] == i]) for i in layers},
            "overall": combine(rows)}


def text_windows(token_ids: Sequence[int], window: int, max_windows: int | None = None) -> list[Tensor]:
    """Cut a token stream into non-overlapping (1, ≤ window) id tensors (the last may be shorter)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if len(token_ids) < 2:
        raise ValueError("the text has fewer than 2 tokens; pass a longer held-out text")
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    pieces = [ids[i:i + window][None] for i in range(0, len(ids), window) if len(ids) - i >= 2]
    return pieces[:max_windows] if max_windows is not None else pieces


@torch.no_grad()
def output_drift(model: nn.Module, windows: Sequence[Tensor], *, device: torch.device | str = "cpu") -> dict[str, float]:
    """KL(base ‖ tuned) of next-token distributions, averaged over every position of `windows`.

    Args:
        model: a CausalLM carrying LoRA adapters (put in eval mode here).
        windows: (1, T) token-id tensors, e.g. from `text_windows`.
    Returns:
        {"kl": mean nats per token, "kl_max": the largest per-token KL, "tokens": positions}.
    """
    if not windows:
        raise ValueError("no text windows; pass a non-empty held-out text")
    model.eval()
    total, worst, count = 0.0, 0.0, 0
    for ids in windows:
        ids = ids.to(device)
        tuned = F.log_softmax(model(ids).float(), dim=-1)
        with adapters_disabled(model):
            base = F.log_softmax(model(ids).float(), dim=-1)
        kl = (base.exp() * (base - tuned)).sum(-1).clamp_min(0.0)  # (1, T); clamp rounding below 0
        total += float(kl.sum())
        worst = max(worst, float(kl.max()))
        count += kl.numel()
    return {"kl": total / count, "kl_max": worst, "tokens": count}


def diagnostics_table(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """A Markdown table: one line per layer, then the overall summary."""
    lines = ["| layer | modules | erank / r | erank | ‖ΔW‖_F | max ‖XᵀX−I‖ of the Stiefel factor |",
             "|---|---|---|---|---|---|"]
    entries = list(summary["layers"].items()) + [("all", summary["overall"])]
    for name, s in entries:
        lines.append(f"| {name} | {s['modules']} | {s['effective_rank_ratio']:.3f} | {s['effective_rank']:.2f} "
                     f"| {s['fro_norm']:.4f} | {s['stiefel_error']:.1e} |")
    return "\n".join(lines)


def held_out_text() -> str:
    """Default held-out English: the test-split paragraphs of CPython's documentation (never trained on)."""
    from fora.training.cloze import prose_paragraphs

    return "\n\n".join(prose_paragraphs("test"))


def analyze_adapter(model: nn.Module, tokenizer, text: str, *, window: int = 256, max_windows: int | None = 16,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """Every diagnostic of an adapted model: per-module rows, summaries and the KL drift on `text`.

    Args:
        model: a CausalLM carrying LoRA adapters.
        tokenizer: its tokenizer (`encode(text, bos=...)`).
        text: held-out text; cut into non-overlapping windows of `window` tokens (at most
            `max_windows` of them) for the KL.
    """
    if not text.strip():
        raise ValueError("the held-out text is empty; pass a file with some English prose")
    rows = adapter_diagnostics(model)
    windows = text_windows(tokenizer.encode(text, bos=False), window, max_windows)
    return {"modules": rows, "summary": summarize(rows), "drift": output_drift(model, windows, device=device),
            "window": window}
