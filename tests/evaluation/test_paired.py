"""fora.evaluation.paired against direct computations on small synthetic correctness tables."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fora.evaluation.paired import (INTERACTION, contrast_interval, interaction, mcnemar_exact, paired_difference,
                                    t_interval, t_quantile)


def _table(seeds: int, items: int, p: float = 0.6, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((seeds, items)) < p).astype(float)


def test_identical_arms_give_zero_and_mcnemar_p_one():
    a = _table(3, 200)
    r = paired_difference(a, a.copy(), n_boot=500)
    assert r.estimate == 0 and r.low == 0 == r.high  # every draw of a paired difference of equal arms is 0
    assert mcnemar_exact(a[0], a[0]) == {"only_a": 0, "only_b": 0, "p": 1.0}


def test_fixed_shift_is_recovered():
    a = _table(2, 300, seed=1)
    b = a.copy()
    wrong_in_a = np.flatnonzero(a[0] == 0)[:30]
    b[:, wrong_in_a] = 1  # b = a plus 30 items right on both seeds (they were wrong for a on seed 0)
    expected = float(np.mean([(b[s] - a[s]).mean() for s in range(2)]))  # direct: per-seed accuracy gaps
    r = paired_difference(b, a, n_boot=2000, seed=3)
    assert r.estimate == pytest.approx(expected) and r.low < expected < r.high
    # a constant per-item difference: every resampled set shows it, the interval collapses onto it
    one = paired_difference(np.ones((2, 50)), np.zeros((2, 50)), n_boot=200)
    assert (one.estimate, one.low, one.high) == (1.0, 1.0, 1.0)
    # ... also with clusters of unequal sizes (each draw is an accuracy over the records it drew)
    sizes = [1, 5, 2, 9, 1, 3] * 4
    clusters = [c for c, k in enumerate(sizes) for _ in range(k)]
    n = len(clusters)
    lop = paired_difference(np.ones((1, n)), np.zeros((1, n)), clusters=clusters, n_boot=200)
    assert (lop.estimate, lop.low, lop.high) == pytest.approx((1.0, 1.0, 1.0))


def test_unclustered_width_matches_the_normal_formula():
    a, b = _table(1, 2000, 0.7, seed=4), _table(1, 2000, 0.6, seed=5)
    d = a[0] - b[0]
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)  # direct: CLT interval of a paired mean
    r = paired_difference(a, b, n_boot=4000, seed=0)
    assert r.estimate == pytest.approx(d.mean())
    assert r.width == pytest.approx(2 * half, rel=0.08)
    assert r.low == pytest.approx(d.mean() - half, abs=0.006) and r.high == pytest.approx(d.mean() + half, abs=0.006)


def test_perfectly_correlated_clusters():
    """m copies of each item: clustered = the one-copy table's interval; unclustered sqrt(m) too narrow."""
    m, C = 9, 120
    a, b = _table(1, C, 0.7, seed=6), _table(1, C, 0.5, seed=7)
    rep_a, rep_b = np.repeat(a, m, axis=1), np.repeat(b, m, axis=1)
    clusters = np.repeat(np.arange(C), m).tolist()
    single = paired_difference(a, b, n_boot=3000, seed=11)
    clustered = paired_difference(rep_a, rep_b, clusters=clusters, n_boot=3000, seed=11)
    naive = paired_difference(rep_a, rep_b, n_boot=3000, seed=11)
    assert clustered.estimate == pytest.approx(single.estimate) == pytest.approx(naive.estimate)
    assert (clustered.low, clustered.high) == pytest.approx((single.low, single.high))  # same draws, same means
    assert clustered.n_clusters == C and naive.n_clusters == C * m
    assert naive.width / clustered.width == pytest.approx(1 / math.sqrt(m), rel=0.15)


def test_cluster_ids_of_any_kind_and_order():
    a, b = _table(1, 60, seed=8), _table(1, 60, seed=9)
    ints = [i // 3 for i in range(60)]
    names = [f"sentence-{c}" for c in ints]
    assert paired_difference(a, b, clusters=ints, seed=2) == paired_difference(a, b, clusters=names, seed=2)


def test_deterministic_given_seed():
    a, b = _table(3, 100, seed=10), _table(3, 100, seed=12)
    assert paired_difference(a, b, seed=5) == paired_difference(a, b, seed=5)
    assert paired_difference(a, b, seed=5) != paired_difference(a, b, seed=6)


def test_seed_level_resampling_widens_by_seed_spread():
    """Per-seed gaps of +0.1 and -0.1 with tiny item noise: resampling seeds must span both."""
    n = 400
    base = np.zeros((2, n))
    up = base.copy()
    up[0, :40] = 1          # seed 0: +0.1
    down = base.copy()
    down[1, :40] = 1        # seed 1: arm b ahead by 0.1
    r = paired_difference(up, down, n_boot=2000, seed=0)
    assert r.estimate == pytest.approx(0.0)
    assert r.low < -0.08 and r.high > 0.08
    items_only = paired_difference(up, down, n_boot=2000, seed=0, resample_seeds=False)
    assert items_only.width < r.width / 2


def test_interaction_of_an_additive_table_is_zero():
    """Per seed and item the four arms' scores are additive (Fisher effect + Stiefel effect):
    y = base + f + s with no f*s term, so (fora - fg) - (stiefel - lora) = 0 on every item."""
    rng = np.random.default_rng(13)
    base = rng.integers(0, 2, (2, 150)).astype(float)
    f, s = rng.integers(0, 2, (2, 150)), rng.integers(0, 2, (2, 150))
    arms = {"lora": base, "fg-lora": base + f, "stiefel-lora": base + s, "fora": base + f + s}
    r = interaction(arms, n_boot=300)
    assert (r.estimate, r.low, r.high) == (0.0, 0.0, 0.0)
    # an added synergy on 15 items of every seed reads as +0.1
    arms["fora"] = arms["fora"] + (np.arange(150) < 15)
    direct = np.mean([sum(w * arms[a][k].mean() for a, w in INTERACTION.items()) for k in range(2)])
    r = interaction(arms, n_boot=1000)
    assert r.estimate == pytest.approx(direct) == pytest.approx(0.1) and r.low <= 0.1 <= r.high


@pytest.mark.parametrize("only_a, only_b, agree", [(7, 2, 30), (0, 5, 10), (12, 12, 0), (1, 0, 3)])
def test_mcnemar_against_a_hand_binomial(only_a, only_b, agree):
    a = [1] * only_a + [0] * only_b + [1] * agree
    b = [0] * only_a + [1] * only_b + [1] * agree
    n, k = only_a + only_b, min(only_a, only_b)
    hand = min(1.0, 2 * sum(math.comb(n, j) * 0.5 ** n for j in range(k + 1)))
    got = mcnemar_exact(a, b)
    assert (got["only_a"], got["only_b"]) == (only_a, only_b) and got["p"] == pytest.approx(hand, rel=1e-12)
    assert mcnemar_exact([1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0])["p"] == pytest.approx(2 / 64)


def test_mcnemar_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(14)
    for _ in range(5):
        a, b = rng.random(300) < 0.6, rng.random(300) < 0.55
        got = mcnemar_exact(a, b)
        want = stats.binomtest(got["only_a"], got["only_a"] + got["only_b"], 0.5).pvalue
        assert got["p"] == pytest.approx(want, rel=1e-9)


def test_t_quantile_and_interval():
    for df, textbook in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):  # the printed t table
        assert t_quantile(0.975, df) == pytest.approx(textbook, abs=1e-3)
    a, b = [0.80, 0.90, 0.85], [0.70, 0.72, 0.71]
    x = np.subtract(a, b)
    r = t_interval(a, b)
    half = t_quantile(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    assert (r.estimate, r.low, r.high) == pytest.approx((x.mean(), x.mean() - half, x.mean() + half))
    one = t_interval([0.8], [0.7])
    assert one.estimate == pytest.approx(0.1) and one.low is None and one.width is None


def test_t_quantile_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 7):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-6)


def test_bad_input_errors():
    a = _table(1, 10)
    with pytest.raises(ValueError, match=r"arms differ in \[seeds, items\] shape"):
        paired_difference(a, _table(1, 11))
    with pytest.raises(ValueError, match=r"clusters has 3 ids for 10 items; pass one cluster id per test item"):
        paired_difference(a, a, clusters=[0, 1, 2])
    with pytest.raises(ValueError, match=r"no per-item results for arm\(s\) \['fora'\]"):
        contrast_interval({"lora": a}, {"fora": 1, "lora": -1})
    with pytest.raises(ValueError, match=r"want per-item values shaped \[seeds, items\]"):
        paired_difference(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="n_boot must be >= 1"):
        paired_difference(a, a, n_boot=0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        paired_difference(a, a, level=95)
    with pytest.raises(ValueError, match="mcnemar_exact wants two 1-D correctness vectors of one length"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="t_interval wants one value per seed"):
        t_interval([])
    with pytest.raises(ValueError, match="t_quantile wants df >= 1"):
        t_quantile(0.975, 0)


def test_stratified_interval_is_the_mean_over_strata_with_its_normal_width():
    """Tasks of unequal sizes and accuracies: the estimate is the mean of the per-task accuracies (not
    the pooled one), and the interval, items resampled within their task, has that mean's normal width."""
    sizes, ps = (400, 100, 1000, 250), (0.9, 0.5, 0.3, 0.7)
    rng = np.random.default_rng(8)
    y = np.concatenate([(rng.random(n) < p).astype(float) for n, p in zip(sizes, ps)])[None, :]
    strata = [t for t, n in enumerate(sizes) for _ in range(n)]
    means = [y[0, np.array(strata) == t].mean() for t in range(4)]
    direct = float(np.mean(means))
    half = 1.96 * math.sqrt(sum(m * (1 - m) / n for m, n in zip(means, sizes))) / 4  # var of a mean of 4 means
    r = contrast_interval({"a": y}, {"a": 1.0}, strata=strata, n_boot=4000, seed=0)
    assert abs(direct - y.mean()) > 0.05 and r.estimate == pytest.approx(direct)
    assert r.width == pytest.approx(2 * half, rel=0.08)
    assert r.low == pytest.approx(direct - half, abs=0.006) and r.high == pytest.approx(direct + half, abs=0.006)
    one = contrast_interval({"a": y}, {"a": 1.0}, strata=[0] * y.shape[1], n_boot=4000, seed=0)
    pooled = contrast_interval({"a": y}, {"a": 1.0}, n_boot=4000, seed=0)
    assert (one.estimate, one.width) == pytest.approx((pooled.estimate, pooled.width), rel=0.08)  # one stratum: pooled
    with pytest.raises(ValueError, match="a cluster spans two strata"):
        contrast_interval({"a": y[:, :4]}, {"a": 1.0}, clusters=[0, 0, 1, 1], strata=[0, 1, 1, 1], n_boot=10)
