"""The training methods as a table: which layers, which Stiefel constraint, which ranks.

| method         | layers (selector)              | Stiefel factor     | ranks                  |
|----------------|--------------------------------|--------------------|------------------------|
| fora           | Fisher top-K (Eq. 2-3)         | yes, CayleyAdam    | r                      |
| fg-lora        | Fisher top-K                   | none, AdamW        | r                      |
| stiefel-lora   | all L                          | yes, CayleyAdam    | r                      |
| lora           | all L                          | none, AdamW        | r                      |
| lora-half-rank | all L                          | none, AdamW        | r/2 (FoRA's budget at K = L/2) |
| random-k       | K random layers (seeded)       | yes, CayleyAdam    | r                      |
| cka            | K least-similar layers (CKA)   | none, AdamW        | r                      |
| fim-lora       | all L                          | none, AdamW        | FIM pattern (budget L*|targets|*r) |
| dora           | all L                          | none, AdamW (+ DoRA magnitude m) | r        |
| qdora          | all L, 4-bit NF4 base          | none, AdamW (+ DoRA magnitude m) | r        |
| adalora        | all L                          | none, AdamW (+ AdaLoRA E)        | init_r pruned to target_r·M |

"yes" is B (FoRA as its authors run it: B column-orthonormal, A ~ N(0, 1/r), a gate g = 0) by
default, or A with `--stiefel-factor A` (the row-orthonormal-A ablation); either way the same
layers and ranks.
`random-k` keeps FoRA's Stiefel factor, so fora vs random-k isolates the *selection* (Fisher vs
chance) with everything else equal. `cka` follows seed 003 (plain LoRA on the layers that
transform the representation most). The first four rows are the paper's 2x2 table. `dora` and
`qdora` are the DoRA baselines the paper compares with (Table 1 and §4.5; `fora.baselines.dora`); QFoRA
itself is `fora` with `--quantize nf4`.

Deviations from the seed methods, recorded in `selection.json` under `deviations` (see
`DEVIATIONS`) so that they travel with the results: FIM-LoRA's statistic (default second moment,
FIM-LoRA's text says variance), its sum over B's entries (the reference code averages), its cap
r_max = 4 r (the reference code: 2 r); CKA's samples at random cut points (seed 003: last token).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fora.baselines.adalora import AdaLoRALinear
from fora.baselines.dora import DoRALinear
from fora.lora import LoRALinear

Batches = Sequence[Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class Selection:
    """Where the adapters go: layer indices, optional per-layer scores and per-module ranks."""

    layers: list[int]
    scores: list[float] | None = None
    rank_pattern: dict[str, int] | None = None


@dataclass(frozen=True)
class SelectArgs:
    """What a selector may use (K already resolved and checked against L)."""

    model: nn.Module
    batches: Batches
    num_layers: int
    k: int
    rank: int
    targets: tuple[str, ...]
    seed: int
    fisher_params: str
    fim_statistic: str = "second_moment"
    fim_r_min: int = 1
    fim_r_max: int | None = None


def _fisher_top_k(a: SelectArgs) -> Selection:
    from fora.fisher import fisher_scores
    from fora.selection import select_layers

    scores = fisher_scores(a.model, a.batches, params=a.fisher_params, targets=a.targets)
    return Selection(select_layers(scores, a.k, by="fisher"), scores.tolist())


def random_prefixes(batches: Batches, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each (right-padded) sequence cut after a uniformly random number of its tokens (>= 1).

    `fora.baselines.cka.cka_scores` reads the residual stream at each sequence's last real token. On
    instruction data every sequence ends with the same token (EOS, or the template's last
    character), so the stream entering layer 0 would be one vector repeated and CKA undefined.
    Cutting at random positions makes the samples token representations at varied positions.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        lengths = mask.sum(1)
        keep = 1 + (torch.rand(lengths.shape, generator=g) * lengths).long().clamp_max(lengths - 1)
        cut = (torch.arange(mask.shape[1])[None, :] < keep[:, None]).to(mask.dtype) * mask
        out.append({**batch, "attention_mask": cut})
    return out


def _cka_bottom_k(a: SelectArgs) -> Selection:
    from fora.baselines.cka import cka_scores
    from fora.selection import select_layers

    scores = cka_scores(a.model, random_prefixes(a.batches, a.seed))
    return Selection(select_layers(scores, a.k, by="cka"), scores.tolist())


def _random_k(a: SelectArgs) -> Selection:
    from fora.selection import random_layers

    return Selection(random_layers(a.num_layers, a.k, a.seed))


def _all(a: SelectArgs) -> Selection:
    return Selection(list(range(a.num_layers)))


def _all_fim_ranks(a: SelectArgs) -> Selection:
    from fora.baselines.fim_lora import fim_rank_pattern

    pattern = fim_rank_pattern(a.model, a.batches, rank=a.rank, targets=a.targets,
                               passes=len(a.batches), seed=a.seed, statistic=a.fim_statistic,
                               r_min=a.fim_r_min, r_max=a.fim_r_max)
    return Selection(list(range(a.num_layers)), rank_pattern=pattern)


SELECTORS: dict[str, Callable[[SelectArgs], Selection]] = {
    "fisher": _fisher_top_k, "cka": _cka_bottom_k, "random": _random_k, "all": _all, "fim": _all_fim_ranks,
}
# Selectors that pick K of the L layers (the others adapt every layer and ignore --k).
TOP_K_SELECTORS = frozenset({"fisher", "cka", "random"})
# Selectors that need calibration batches (forward/backward passes over task data).
CALIBRATED_SELECTORS = frozenset({"fisher", "cka", "fim"})
RANK_RULES: dict[str, Callable[[int], int]] = {"r": lambda r: r, "r/2": lambda r: max(1, r // 2)}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table."""

    selector: str   # key of SELECTORS
    stiefel: bool   # a factor on the Stiefel manifold (TrainConfig.stiefel_factor, CayleyAdam) or plain (AdamW)
    rank_rule: str  # key of RANK_RULES (the uniform rank; fim adds a per-module pattern)
    description: str
    dora: bool = False           # DoRALinear adapters (trained magnitude per output row)
    quantize: str | None = None  # the --quantize the method requires (qdora: "nf4")
    adalora: bool = False        # AdaLoRALinear triplets, budget-pruned by fora.training.adalora_hooks

    @property
    def adapter(self) -> type[LoRALinear]:
        """The adapter class ``inject_lora`` builds for this method."""
        return AdaLoRALinear if self.adalora else DoRALinear if self.dora else LoRALinear


METHODS: dict[str, MethodSpec] = {
    "fora": MethodSpec("fisher", True, "r", "Fisher top-K layers + Stiefel B and gate (CayleyAdam)"),
    "fg-lora": MethodSpec("fisher", False, "r", "Fisher top-K layers, plain LoRA (AdamW)"),
    "stiefel-lora": MethodSpec("all", True, "r", "all layers + Stiefel B and gate (Park et al.'s Stiefel-LoRA)"),
    "lora": MethodSpec("all", False, "r", "all layers, plain LoRA"),
    "lora-half-rank": MethodSpec("all", False, "r/2", "all layers, plain LoRA at rank r/2"),
    "random-k": MethodSpec("random", True, "r", "K seeded-random layers + Stiefel B (isolates the selection)"),
    "cka": MethodSpec("cka", False, "r", "K least-similar layers by CKA, plain LoRA"),
    "fim-lora": MethodSpec("fim", False, "r", "all layers, FIM-LoRA per-module rank pattern, plain LoRA"),
    "dora": MethodSpec("all", False, "r", "all layers, DoRA (LoRA direction + trained magnitude)", dora=True),
    "qdora": MethodSpec("all", False, "r", "all layers, DoRA on a 4-bit NF4 base (with --quantize nf4)",
                        dora=True, quantize="nf4"),
    "adalora": MethodSpec("all", False, "r", "all layers, AdaLoRA (SVD triplets, pruned from --init-r to "
                          "--target-r by importance)", adalora=True),
}


DEVIATIONS: dict[str, str] = {
    "fim": "FIM-LoRA: each LoRA-B scored by the {statistic} of its gradient over the calibration passes "
           "(FIM-LoRA's text: variance; the reference code: uncentered second moment), summed over B's entries "
           "(the reference code averages over A's); ranks in [{r_min}, {r_max}] (the reference code caps at 2r)",
    "cka": "CKA: the residual stream sampled at one random cut point per sequence (seed 003 uses each "
           "sequence's last token, which on instruction data is the same token everywhere)",
}


def select(method: str, args: SelectArgs) -> Selection:
    """Run the selector of `method` (the base model must not hold adapters yet)."""
    return SELECTORS[METHODS[method].selector](args)


def method_rank(method: str, rank: int) -> int:
    """The uniform LoRA rank `method` uses for `--rank rank`."""
    return RANK_RULES[METHODS[method].rank_rule](rank)


def selection_json(method: str, sel: Selection, batches: Batches, *, num_layers: int,
                   data_sha256: str, seed: int, rank: int, args: SelectArgs | None = None) -> dict[str, Any]:
    """The `selection.json` record: method, scores, selected layers, batches, data hash.

    Built on `fora.selection.selection_record` where the selector produced scores; selectors
    without scores (all, random, fim) get the same keys with `scores: null`.
    """
    from fora.selection import calibration_fingerprint, selection_record

    if sel.scores is not None:
        record = selection_record(sel.scores, sel.layers, batches, method)
    else:
        record = {"method": method, "scores": None, "selected": sorted(sel.layers),
                  "num_layers": num_layers, "k": len(sel.layers), "num_batches": len(batches),
                  "calibration_sha256": calibration_fingerprint(batches) if batches else None}
    spec = METHODS[method]
    record.update(selector=spec.selector, stiefel=spec.stiefel, rank=rank,
                  rank_pattern=sel.rank_pattern, data_sha256=data_sha256, seed=seed)
    if spec.selector == "fim" and args is not None:
        r_max = args.fim_r_max if args.fim_r_max is not None else "min(4r, d_in, d_out)"
        record["fim"] = {"statistic": args.fim_statistic, "reduction": "sum", "r_min": args.fim_r_min,
                         "r_max": r_max, "passes": len(batches)}
        record["deviations"] = DEVIATIONS["fim"].format(statistic=args.fim_statistic.replace("_", " "),
                                                        r_min=args.fim_r_min, r_max=r_max)
    if spec.selector == "cka":
        record["deviations"] = DEVIATIONS["cka"]
    return record
