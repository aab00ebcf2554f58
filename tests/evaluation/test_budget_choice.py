"""The budget chosen on validation (`fora.evaluation.budget_choice`): the gain over zero-shot is the mean over
tasks of each task's paired difference, a rung qualifies when every arm's interval is above 0, and the
smallest qualifying rung is chosen."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from fora.evaluation.budget_choice import budget_choice_markdown, choose_budget, one_label_agreement
from fora.evaluation.measure import validation_scores

SIZES = {"boolq": 40, "piqa": 60}  # unequal: the mean over tasks is not the pooled mean


def _scores(p: float, seed: int, sizes=SIZES) -> dict:
    rng = np.random.default_rng(seed)
    items = {t: (rng.random(n) < p).astype(int).tolist() for t, n in sizes.items()}
    tasks = {t: statistics.fmean(v) for t, v in items.items()}
    return {"average": statistics.fmean(tasks.values()), "tasks": tasks, "n": sum(sizes.values()), "items": items}


def test_the_smallest_budget_that_takes_every_arm_above_zero_shot_is_chosen():
    base = _scores(0.4, 0)
    scores = {"lora": {200: _scores(0.4, 1), 400: _scores(0.95, 2), 600: _scores(0.97, 3)},
              "fora": {200: _scores(0.95, 4), 400: _scores(0.9, 5), 600: _scores(0.95, 6), 800: _scores(1.0, 7)}}
    choice = choose_budget(base, scores, n_boot=500)
    assert [r["steps"] for r in choice["rungs"]] == [200, 400, 600]  # 800: fora only, not a rung
    assert [r["leaves_zero_shot"] for r in choice["rungs"]] == [False, True, True]
    assert choice["chosen"] == 400 and "smallest" in choice["why"]
    for r in choice["rungs"]:
        for arm, a in r["arms"].items():
            s = scores[arm][r["steps"]]
            direct = statistics.fmean(statistics.fmean(s["items"][t]) - statistics.fmean(base["items"][t]) for t in SIZES)
            assert a["gain"]["estimate"] == pytest.approx(direct)
            assert a["gain"]["low"] <= a["gain"]["estimate"] <= a["gain"]["high"]
    assert choice["rungs"][0]["arms"]["lora"]["gain"]["low"] < 0 < choice["rungs"][0]["arms"]["fora"]["gain"]["low"]


def test_no_budget_and_bad_input_say_so():
    base = _scores(0.4, 0)
    flat = choose_budget(base, {"lora": {200: _scores(0.4, 1)}}, n_boot=200)
    assert flat["chosen"] is None and "up to 200 steps" in flat["why"]
    assert choose_budget(base, {"lora": {200: _scores(0.4, 1)}, "fora": {400: _scores(0.4, 2)}})["rungs"] == []
    with pytest.raises(ValueError, match="no arms"):
        choose_budget(base, {})
    with pytest.raises(ValueError, match="other validation items than the base model"):
        choose_budget(base, {"lora": {200: _scores(0.9, 1, {"boolq": 40, "piqa": 59})}})


def test_the_table_shows_every_rung_and_the_choice():
    base = _scores(0.4, 0)
    choice = {"model": "m", "seed": 0, "base": base,
              **choose_budget(base, {"lora": {200: {**_scores(0.95, 1), "lr": 1e-3}}}, n_boot=200)}
    md = budget_choice_markdown(choice, labels={"piqa": "PIQA", "boolq": "BoolQ"})
    lines = md.splitlines()
    assert lines[0].startswith("| model | steps | arm | lr | PIQA | BoolQ | average |")
    assert lines[2] == (f"| m | 0 | base (zero-shot) | | {100 * base['tasks']['piqa']:.1f} | "
                        f"{100 * base['tasks']['boolq']:.1f} | {100 * base['average']:.1f} | | - | |")
    gain = choice["rungs"][0]["arms"]["lora"]["gain"]
    assert "| m | 200 | lora | 0.001 |" in lines[3] and f"{100 * gain['estimate']:+.1f} [{100 * gain['low']:+.1f}," in lines[3]
    assert "**Chosen: 200 steps**" in md


def test_validation_scores_refuse_an_empty_split():
    for tasks in ({}, {"boolq": []}):
        with pytest.raises(ValueError, match="no validation records to score"):
            validation_scores("no-such-model", None, tasks)


def test_one_label_agreement_recognises_a_constant_answer():
    gold = {"piqa": ["solution1", "solution2", "solution2", "solution1"], "arc": ["a1", "a2", "a3", "a1"]}
    always = {t: [int(g == v[0]) for g in v] for t, v in gold.items()}  # always the first item's gold label
    assert one_label_agreement(always, gold) == 1.0
    # a perfect arm on piqa (4 of 4) agrees with a constant answer on 2 of 4; on arc it answers a2 always
    mixed = {"piqa": [1, 1, 1, 1], "arc": [0, 1, 0, 0]}
    assert one_label_agreement(mixed, gold) == pytest.approx((2 / 4 + 4 / 4) / 2)
    base = {"average": 0.5, "tasks": {"piqa": 0.5, "arc": 0.5}, "n": 8, "items": always}
    choice = choose_budget(base, {"lora": {10: {**base, "items": mixed}}}, gold=gold, n_boot=50)
    assert choice["base_one_label"] == 1.0 and choice["rungs"][0]["arms"]["lora"]["one_label"] == pytest.approx(0.75)
    md = budget_choice_markdown({"model": "m", "seed": 0, "base": base, **choice})
    assert "| | 100 % | |" in md.splitlines()[2] and "| 75 % |" in md.splitlines()[3]
    with pytest.raises(ValueError, match="3 results for 4 gold answers"):
        one_label_agreement({"piqa": [1, 0, 1]}, gold)
