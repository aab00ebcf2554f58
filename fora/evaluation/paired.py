"""Paired statistics for comparing fine-tuning arms evaluated on the same test items.

Every arm `a` is a table of per-item correctness `y[a][s, i]` in {0, 1} for seeds `s` (the same
seed of two arms shares data order and initial draws) and items `i` (the same test records for
every arm). A claim is a *contrast*: weights `w_a` summing to zero, e.g. fora - lora
(w = +1, -1) or the 2x2 interaction (fora - fg-lora) - (stiefel-lora - lora).

Point estimate (the mean over seeds of the per-seed contrast of accuracies):

    theta = (1/S) sum_s sum_a w_a acc_a(s),     acc_a(s) = (1/N) sum_i y[a][s, i]

Paired, clustered, two-level bootstrap (`contrast_interval`): items come in clusters (the records
blanking different words of one test sentence; an item is its own cluster when there are none).
One draw resamples the C clusters with replacement (counts m_c), the same clusters for every arm
and every seed (that is the pairing), computes each seed's contrast on the resampled items

    theta_s* = sum_c m_c D_{s,c} / sum_c m_c n_c,   D_{s,c} = sum_{i in c} sum_a w_a y[a][s, i]

(n_c the size of cluster c: an accuracy over the resampled records), then resamples the S seeds
with replacement (counts v_s) and averages: theta* = (1/S) sum_s v_s theta_s*. The interval is the
percentile interval of theta* over the draws. With one seed only the items are resampled.

Stratified (`strata`: one label per item, e.g. its task): the estimate is an average over the T
strata of each stratum's accuracy contrast, as an average over tasks is, and one draw resamples
the clusters of every stratum within it (C_t of them with replacement), so each stratum keeps its
place in the average:

    theta_s* = (1/T) sum_t sum_{c in t} m_c D_{s,c} / sum_{c in t} m_c n_c

With one stratum this is the unstratified draw above.

McNemar's exact test (`mcnemar_exact`) is the second opinion on one seed: two-sided binomial test
of the discordant pairs (b items only arm 1 gets right, c only arm 2) against Binomial(b + c, 1/2).
It treats items as independent, so with clustered records it is optimistic; the bootstrap is the
primary interval.

`t_interval` is for quantities measured once per run (effective rank, KL drift): Student's t on
the seed-paired differences, mean +- t_{S-1} sd / sqrt(S).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
INTERACTION = {"fora": 1.0, "fg-lora": -1.0, "stiefel-lora": -1.0, "lora": 1.0}  # (fora - fg) - (stiefel - lora)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval; `low`/`high` are None when no interval can be formed."""

    estimate: float
    low: float | None
    high: float | None
    n_items: int = 0
    n_clusters: int = 0
    n_seeds: int = 0
    method: str = ""

    @property
    def width(self) -> float | None:
        return None if self.low is None else self.high - self.low


def _as_table(values: Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(values, dtype=np.float64)
    if y.ndim == 1:
        y = y[None, :]
    if y.ndim != 2 or y.shape[1] == 0:
        raise ValueError(f"arm {name!r}: want per-item values shaped [seeds, items], got shape {y.shape}")
    return y


def _cluster_index(clusters: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    """Cluster number (0..C-1, in order of first appearance) of every item, and C."""
    if clusters is None:
        return np.arange(n), n
    if len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} ids for {n} items; pass one cluster id per test item")
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(c, len(ids)) for c in clusters]), len(ids)


def contrast(tables: Mapping[str, Sequence[Sequence[float]] | np.ndarray], weights: Mapping[str, float]
             ) -> np.ndarray:
    """Per-seed, per-item contrast d[s, i] = sum_a w_a y[a][s, i] (arms missing from `tables` raise)."""
    missing = [a for a in weights if a not in tables]
    if missing:
        raise ValueError(f"no per-item results for arm(s) {missing}; have {sorted(tables)}")
    ys = {a: _as_table(tables[a], a) for a in weights}
    shapes = {y.shape for y in ys.values()}
    if len(shapes) != 1:
        raise ValueError(f"arms differ in [seeds, items] shape {sorted(shapes)}; evaluate every arm on the same "
                         "test items and seeds")
    return sum(w * ys[a] for a, w in weights.items())


def contrast_interval(tables: Mapping[str, Sequence[Sequence[float]] | np.ndarray], weights: Mapping[str, float],
                      *, clusters: Sequence[Hashable] | None = None, strata: Sequence[Hashable] | None = None,
                      n_boot: int = 4000, seed: int = 0, level: float = LEVEL,
                      resample_seeds: bool = True) -> Interval:
    """The contrast sum_a w_a acc_a, averaged over seeds, with its paired clustered bootstrap interval.

    Args:
        tables: arm -> per-item correctness [seeds, items] (a 1-D sequence is one seed); the rows of
            every arm are the same seeds in the same order, the columns the same items.
        weights: arm -> weight, e.g. {"fora": 1, "lora": -1}.
        clusters: one id per item (records of one source sentence share it); None: every item alone.
        strata: one label per item (its task); the contrast is then the mean over strata of each
            stratum's contrast, and clusters are resampled within their stratum (a cluster must
            not span two strata). None: one stratum, the items' pooled mean.
        n_boot: bootstrap draws; seed: the draws' generator seed (same seed, same interval).
        resample_seeds: also resample seeds (the second level), when there are two or more.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = contrast(tables, weights)  # [S, N]
    S, N = d.shape
    cid, C = _cluster_index(clusters, N)
    D = np.zeros((S, C))
    np.add.at(D.T, cid, d.T)  # cluster sums per seed
    n_c = np.bincount(cid, minlength=C).astype(np.float64)
    rng = np.random.default_rng(seed)
    if strata is None:
        m = rng.multinomial(C, np.full(C, 1.0 / C), size=n_boot).astype(np.float64)  # [B, C]
        per_seed = (m @ D.T) / (m @ n_c)[:, None]  # [B, S]
        estimate = float(d.mean())
    else:
        sid, T = _cluster_index(strata, N)
        of_cluster = np.full(C, -1)
        of_cluster[cid] = sid
        if (of_cluster[cid] != sid).any():
            raise ValueError("a cluster spans two strata; give every record of a cluster the same stratum")
        per_seed = np.zeros((n_boot, S))
        for t in range(T):  # each stratum resampled within itself, then the strata averaged
            cs = np.flatnonzero(of_cluster == t)
            m = rng.multinomial(cs.size, np.full(cs.size, 1.0 / cs.size), size=n_boot).astype(np.float64)
            per_seed += (m @ D[:, cs].T) / (m @ n_c[cs])[:, None] / T
        estimate = float(np.mean([d[:, sid == t].mean() for t in range(T)]))
    if resample_seeds and S > 1:
        v = rng.multinomial(S, np.full(S, 1.0 / S), size=n_boot)  # [B, S]
        draws = (v * per_seed).sum(1) / S
    else:
        draws = per_seed.mean(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    strat = "" if strata is None else f" in {T} strata"
    return Interval(estimate, float(low), float(high), N, C, S,
                    f"paired bootstrap ({n_boot} draws, {C} clusters{strat}{', seeds' if resample_seeds and S > 1 else ''})")


def paired_difference(a: Sequence[Sequence[float]] | np.ndarray, b: Sequence[Sequence[float]] | np.ndarray,
                      **kwargs) -> Interval:
    """acc(a) - acc(b) over the same items and seeds, with `contrast_interval`'s bootstrap interval."""
    return contrast_interval({"a": a, "b": b}, {"a": 1.0, "b": -1.0}, **kwargs)


def interaction(tables: Mapping[str, Sequence[Sequence[float]] | np.ndarray], **kwargs) -> Interval:
    """The 2x2 interaction (super-additivity) (acc(fora) - acc(fg-lora)) - (acc(stiefel-lora) - acc(lora))."""
    return contrast_interval(tables, INTERACTION, **kwargs)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """McNemar's exact test of two arms' per-item correctness on one seed.

    Returns {"only_a", "only_b", "p"}: the discordant counts b, c and the two-sided p-value
    p = min(1, 2 sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)) (p = 1 without discordant pairs).
    """
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"mcnemar_exact wants two 1-D correctness vectors of one length, got {x.shape} and {y.shape}")
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": min(1.0, 2 * tail)}


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (q in (0.5, 1)) by bisection on the CDF, integrated with Simpson's rule."""
    if df < 1 or not 0.5 < q < 1:
        raise ValueError(f"t_quantile wants df >= 1 and 0.5 < q < 1, got df={df}, q={q}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:  # 1/2 + the density's integral over [0, x] (x >= 0)
        n = 2000
        h = x / n
        f = [c * (1 + (h * j) ** 2 / df) ** (-(df + 1) / 2) for j in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def t_interval(a: Sequence[float], b: Sequence[float] | None = None, *, level: float = LEVEL) -> Interval:
    """Mean of the seed-paired differences a_s - b_s (or of a_s) with Student's t interval; one seed: no interval."""
    x = np.asarray(a, dtype=np.float64) - (0.0 if b is None else np.asarray(b, dtype=np.float64))
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"t_interval wants one value per seed (1-D, paired), got shape {x.shape}")
    S = x.size
    if S < 2:
        return Interval(float(x.mean()), None, None, n_seeds=S, method="one seed: no interval")
    half = t_quantile(1 - (1 - level) / 2, S - 1) * float(x.std(ddof=1)) / math.sqrt(S)
    return Interval(float(x.mean()), float(x.mean()) - half, float(x.mean()) + half, n_seeds=S,
                    method=f"t over {S} seeds")
