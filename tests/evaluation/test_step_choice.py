"""The Stiefel-step rule (fora.evaluation.step_choice) on synthetic step-scale runs with known answers."""
import numpy as np
import pytest

from fora.evaluation.step_choice import ACC_MARGIN, choose_stiefel_step, step_choice_markdown

N = 400
M = "smollm2-135m"


def _label(scale: float) -> str:
    return "fora" if scale == 1 else f"fora ×{scale:g}"


def _runs(spec: dict[float, dict[int, tuple[float, np.ndarray]]]):
    """spec: scale -> seed -> (kl, per-item correctness); returns (rows, items) as reproduce.py stores them."""
    rows, items = [], {}
    for scale, seeds in spec.items():
        for seed, (kl, right) in seeds.items():
            rows.append({"model": M, "method": "fora", "arm": _label(scale), "seed": seed,
                         "stiefel_lr_scale": scale, "kl": kl, "acc_loglik": float(right.mean())})
            items[M, _label(scale), seed] = {"test_sha256": "t", "clusters": list(range(N)),
                                            "acc_loglik": right.astype(int).tolist()}
    return rows, items


def _worse(right: np.ndarray, points: int) -> np.ndarray:
    """The same items with `points` percent of them turned from right to wrong."""
    out = right.copy()
    out[np.flatnonzero(out)[: points * N // 100]] = 0
    return out


@pytest.fixture
def base():
    rng = np.random.default_rng(0)
    return {s: rng.random(N) < 0.6 for s in (0, 1)}


def test_the_largest_scale_with_lower_drift_and_no_accuracy_loss_is_chosen(base):
    rows, items = _runs({1.0: {s: (0.5 + 0.1 * s, base[s]) for s in base},
                         0.25: {s: (0.2 + 0.1 * s, base[s]) for s in base},
                         0.0625: {s: (0.1 + 0.1 * s, base[s]) for s in base}})
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    assert c["chosen"] == 0.25
    assert [r["scale"] for r in c["scales"]] == [0.25, 0.0625]
    quarter = c["scales"][0]
    assert quarter["kl"]["estimate"] == pytest.approx(-0.3)
    assert quarter["accuracy"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}  # identical items: no spread
    assert all(r["eligible"] for r in c["scales"])
    assert "largest scale" in c["why"]


def test_a_scale_losing_more_than_the_margin_is_passed_over(base):
    rows, items = _runs({1.0: {s: (0.5 + 0.1 * s, base[s]) for s in base},
                         0.25: {s: (0.2 + 0.1 * s, _worse(base[s], 10)) for s in base},
                         0.0625: {s: (0.1 + 0.1 * s, base[s]) for s in base}})
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    quarter = c["scales"][0]
    assert quarter["accuracy"]["estimate"] == pytest.approx(-0.10, abs=1 / N)  # a direct mean difference
    assert quarter["accuracy"]["high"] < -ACC_MARGIN and quarter["eligible"] is False
    assert c["chosen"] == 0.0625


def test_higher_drift_disqualifies_and_a_single_seed_leaves_it_undecided(base):
    rows, items = _runs({1.0: {s: (0.5 + 0.1 * s, base[s]) for s in base},
                         0.25: {s: (0.7 + 0.1 * s, base[s]) for s in base},    # drift up
                         0.0625: {0: (0.1, base[0])}})                          # one seed: no t interval
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    assert [r["eligible"] for r in c["scales"]] == [False, None]
    assert c["chosen"] == 1.0 and c["why"].startswith("undecided at this scale: ×0.0625")
    md = step_choice_markdown([c])
    assert "| smollm2-135m | fora ×0.25 | 2 | +0.200 [+0.200, +0.200] | +0.0 pt [+0.0 pt, +0.0 pt] | " \
        "no: drift not shown below ×1's (KL interval reaches 0) |" in md
    assert "| smollm2-135m | fora ×0.0625 | 1 | -0.400 | +0.0 pt [+0.0 pt, +0.0 pt] | undecided |" in md
    assert "**chosen: ×1**" in md


def test_nothing_qualifies_keeps_the_default(base):
    rows, items = _runs({1.0: {s: (0.5 + 0.1 * s, base[s]) for s in base},
                         0.25: {s: (0.2 + 0.1 * s, _worse(base[s], 10)) for s in base}})
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    assert c["chosen"] == 1.0 and c["why"] == "no scale lowers the drift without losing more than 2 pt: ×1 stays"
    assert c["scales"][0]["fails"] == ["loses more than 2 pt"]


def test_drift_lower_on_every_seed_but_not_by_its_interval_is_out_and_says_why(base):
    # two seeds whose KL drops by 1.4 and 0.2: every seed drifts less, but the t interval of the
    # mean drop (-0.8 +- 12.7 * 0.6) reaches 0, so the rule cannot count it as lower drift
    rows, items = _runs({1.0: {s: (2.0 + 0.5 * s, base[s]) for s in base},
                         0.25: {0: (0.6, base[0]), 1: (2.3, base[1])},
                         0.0625: {0: (0.6, base[0]), 1: (2.3, _worse(base[1], 20))}})
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    quarter, sixteenth = c["scales"]
    assert quarter["kl"]["estimate"] == pytest.approx(-0.8)
    assert quarter["kl"]["high"] > 0 > quarter["kl"]["estimate"]
    assert quarter["fails"] == ["drift not shown below ×1's (KL interval reaches 0)"]
    assert sixteenth["fails"] == ["drift not shown below ×1's (KL interval reaches 0)", "loses more than 2 pt"]
    assert c["chosen"] == 1.0
    assert c["why"] == ("no scale qualifies (×0.25: drift not shown below ×1's (KL interval reaches 0); "
                        "×0.0625: drift not shown below ×1's (KL interval reaches 0) and loses more than 2 pt)"
                        ": ×1 stays")


def test_a_larger_undecided_scale_makes_a_smaller_choice_provisional(base):
    rows, items = _runs({1.0: {s: (0.5 + 0.1 * s, base[s]) for s in base},
                         0.25: {0: (0.2, base[0])},
                         0.0625: {s: (0.1 + 0.1 * s, base[s]) for s in base}})
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    assert c["chosen"] == 0.0625
    assert c["why"] == ("undecided at this scale: ×0.25 lacks an interval (one seed or no items.json); "
                        "×0.0625 qualifies so far")

    rows, items = _runs({1.0: {s: (0.5 + 0.1 * s, base[s]) for s in base},
                         0.25: {0: (0.2, base[0])}, 0.0625: {0: (0.1, base[0])}})
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    assert c["chosen"] == 1.0
    assert c["why"] == "undecided at this scale: ×0.25, ×0.0625 lack an interval (one seed or no items.json)"


def test_without_per_item_results_accuracy_stays_open(base):
    rows, items = _runs({1.0: {s: (0.5 + 0.1 * s, base[s]) for s in base},
                         0.25: {s: (0.2 + 0.1 * s, base[s]) for s in base}})
    items = {k: (None if k[1] != "fora" else v) for k, v in items.items()}
    c = choose_stiefel_step(rows, items, M, n_boot=500)
    assert c["scales"][0]["accuracy"]["low"] is None and c["scales"][0]["eligible"] is None
    assert c["chosen"] == 1.0
    assert choose_stiefel_step(rows[2:], items, M)["why"] == \
        "undecided at this scale: no fora run at x1 to compare with"
