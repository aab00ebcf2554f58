"""`--selection-from RUN`: a run reuses another run's layer selection only when it is the selection
it would compute itself (checked against a fresh scoring), and refuses with what differs otherwise."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import fora.training.distributed
from fora.training.config import TrainConfig
from fora.training.run import main
from fora.training.selection_reuse import find_shared_selection

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _selection(out: str | Path) -> dict:
    return json.loads((Path(out) / "selection.json").read_text())


@pytest.fixture
def source(cfg, tmp_path) -> TrainConfig:
    """A finished FoRA run at K = 2 (Fisher-scored), the run to reuse."""
    src = replace(cfg, out=str(tmp_path / "fora"), k=2, fisher_batches=3)
    main(src)
    return src


def test_reused_selection_is_the_one_a_fresh_scoring_computes(source, tmp_path, monkeypatch):
    fresh = replace(source, method="fg-lora", out=str(tmp_path / "fresh"))
    main(fresh)  # scores the layers itself

    calls = []
    real = fora.training.distributed.distributed_select
    monkeypatch.setattr(fora.training.run, "distributed_select", lambda *a: calls.append(a) or real(*a))
    reused = replace(fresh, out=str(tmp_path / "reused"), selection_from=source.out)
    main(reused)
    assert calls == []  # nothing scored
    got, want = _selection(reused.out), _selection(fresh.out)
    assert got["reused_from"] == source.out
    assert got["selected"] == want["selected"] and got["scores"] == pytest.approx(want["scores"], rel=1e-6)
    assert got["calibration_sha256"] == want["calibration_sha256"]


def test_a_run_still_training_lends_its_checkpoint_selection(source, tmp_path):
    folder = tmp_path / "running"
    (folder / "checkpoint").mkdir(parents=True)
    for name in ("selection.json", "train_config.json"):
        shutil.copy(Path(source.out) / name, folder / "checkpoint" / name)
    out = replace(source, method="fg-lora", out=str(tmp_path / "b"), selection_from=str(folder))
    main(out)
    assert _selection(out.out)["selected"] == _selection(source.out)["selected"]


@pytest.mark.parametrize("change, says", [
    ({"seed": 7}, "calibration_sha256"),                  # other calibration batches
    ({"fisher_batches": 2}, "calibration_sha256"),
    ({"k": 3}, "k 2 there, 3 here"),
    ({"fisher_params": "targets"}, "--fisher-params 'block' there, 'targets' here"),
    ({"dtype": "bfloat16"}, "--dtype"),
    ({"method": "cka"}, "selector 'fisher' there, 'cka' here"),
])
def test_a_different_selection_is_refused_with_what_differs(source, tmp_path, change, says):
    other = replace(source, method="fg-lora", out=str(tmp_path / "b"), selection_from=source.out)
    with pytest.raises(ValueError, match="not the one this run would compute") as e:
        main(replace(other, **change))
    assert says in str(e.value)


def test_missing_or_unreadable_sources_are_named(source, tmp_path):
    base = replace(source, method="fg-lora", out=str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        main(replace(base, selection_from=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="selection.json is missing"):
        main(replace(base, selection_from=str(tmp_path / "empty")))
    broken = tmp_path / "broken"
    shutil.copytree(source.out, broken)
    (broken / "selection.json").write_text('{"selected": [1,')
    with pytest.raises(ValueError, match="is not valid JSON"):
        main(replace(base, selection_from=str(broken)))


def test_methods_that_score_nothing_refuse_it(cfg):
    with pytest.raises(ValueError, match="--method lora does not score layers"):
        replace(cfg, method="lora", selection_from="runs/a")


def test_find_shared_selection_picks_the_first_matching_run(tmp_path, cfg):
    config = replace(cfg, method="fg-lora").to_dict()

    def run(name, selector="fisher", rank_pattern=None, rank=4, **changes):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "selection.json").write_text(json.dumps({"selector": selector, "selected": [1],
                                                           "rank_pattern": rank_pattern, "rank": rank}))
        (folder / "train_config.json").write_text(json.dumps({**config, **changes}))
        return folder

    (tmp_path / "empty").mkdir()
    candidates = [tmp_path / "empty", run("cka", selector="cka"), run("seed", seed=9), run("n", fisher_batches=9),
                  run("dtype", dtype="bfloat16"), run("pattern", rank_pattern={"x": 2}, rank=8), run("good"), run("later")]
    assert find_shared_selection(candidates, config, "fisher") == tmp_path / "good"
    assert find_shared_selection(candidates[:-2], config, "fisher") is None
    assert find_shared_selection(candidates, config, "all") is None  # lora scores nothing
    assert find_shared_selection(candidates, {**config, "rank": 8}, "fisher") == tmp_path / "pattern"
