"""Trainer equivalences and the options of the ablation: gradient accumulation equals one big
batch, clipping is one global norm over A, B and the gates, FIM-LoRA / CKA settings reach selection.json,
--match-init-norm gives plain A's the Stiefel row norm. Tiny random checkpoint, CPU, float32."""
from __future__ import annotations

import json
import math
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fora.training.run
from fora.baselines.fim_lora import fim_rank_pattern
from fora.formats.loading import load_model, load_tokenizer
from fora.inject import inject_lora, lora_modules
from fora.training.config import TrainConfig
from fora.training.flags import parse_args
from fora.training.init_norm import unit_row_norms
from fora.training.methods import METHODS
from fora.training.run import main, prepare_data

L = 4

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps([{"instruction": f"Is {i} even?" + " really" * (i % 3), "input": "",
                                 "output": "yes" if i % 2 == 0 else "no"} for i in range(40)]))
    return path


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter_model.safetensors")


def _record_gradients(monkeypatch) -> tuple[list[dict[int, torch.Tensor]], list[dict[int, torch.Tensor]]]:
    """Gradients per step as produced (before clipping) and as each optimizer sees them at its step:
    two lists of {id(parameter): gradient}, one dict per training step."""
    produced, seen = [], []
    real_clip, real_build = torch.nn.utils.clip_grad_norm_, fora.training.run.build_optimizers

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        produced.append({id(p): p.grad.detach().clone() for p in params})
        seen.append({})
        return real_clip(params, max_norm, *args, **kwargs)

    def build(*args, **kwargs):
        optimizers = real_build(*args, **kwargs)
        for opt in optimizers:
            def step(self, *a, _step=opt.step, **kw):
                seen[-1].update({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]})
                return _step(*a, **kw)
            opt.step = types.MethodType(step, opt)  # a bound method, as LambdaLR expects
        return optimizers
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(fora.training.run, "build_optimizers", build)
    return produced, seen


def test_grad_accumulation_equals_one_big_batch_and_clipping_is_global(tiny, tmp_path, monkeypatch):
    # 16 records, 8 held out: each step sees all 8 training examples, as one batch of 8 or as two
    # micro-batches of 4 (of different lengths: token weighting must be over the whole step).
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Is it" + " very" * i + " even?", "input": "",
                                 "output": "yes" if i % 2 else "no"} for i in range(16)]))
    base = TrainConfig(model=str(tiny), data=str(data), method="stiefel-lora", rank=4, device="cpu", val_size=8,
                       max_steps=2, warmup_steps=0, lr=1e-2, log_every=1, eval_every=0, save_every=0,
                       lora_dropout=0.0, max_grad_norm=1e-3)
    grads, adapters = {}, {}
    for name, bs, accum in (("big", 8, 1), ("accum", 4, 2)):
        grads[name] = _record_gradients(monkeypatch)
        main(replace(base, batch_size=bs, grad_accum=accum, out=str(tmp_path / name)))
        adapters[name] = _adapter(tmp_path / name)
        monkeypatch.undo()
    (big, _), (accum, seen) = grads["big"], grads["accum"]
    assert len(big) == len(accum) == len(seen) == 2
    for b_step, a_step in zip(big, accum):
        for x, y in zip(b_step.values(), a_step.values()):  # same parameter order in both runs
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5 * float(x.abs().max()))  # fp32 sum order
    for k in adapters["big"]:
        torch.testing.assert_close(adapters["accum"][k], adapters["big"][k], rtol=1e-4, atol=1e-6)
    # step 2: B has a gradient (the gate is no longer 0); one factor max_norm / ‖(all A, B, g)‖
    # scales the gradient that CayleyAdam (B) and AdamW (A, g) see
    produced, at_step = accum[1], seen[1]
    assert set(produced) == set(at_step)
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in produced.values()))
    b_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in produced.values()
                           if g.ndim == 2 and g.shape[1] == 4))        # the (d_out, r) B's
    assert b_norm > 0.01 * total and total > base.max_grad_norm
    for key, g in produced.items():
        torch.testing.assert_close(at_step[key], g * (base.max_grad_norm / (total + 1e-6)), rtol=1e-5, atol=1e-12)


def test_fim_settings_reach_the_selection_and_the_pattern(cfg, tiny):
    parsed = parse_args(["--model", "m", "--method", "fim-lora", "--fim-statistic", "variance", "--fim-r-min", "2",
                         "--fim-r-max", "6"])
    assert (parsed.fim_statistic, parsed.fim_r_min, parsed.fim_r_max) == ("variance", 2, 6)
    cfg = replace(cfg, method="fim-lora", fim_statistic="variance", fim_r_min=2, fim_r_max=6, max_steps=1)
    main(cfg)
    record = json.loads((Path(cfg.out) / "selection.json").read_text())
    assert record["fim"] == {"statistic": "variance", "reduction": "sum", "r_min": 2, "r_max": 6, "passes": 2}
    assert "variance" in record["deviations"] and "2r" in record["deviations"]
    ranks = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[0]
             for k, v in _adapter(cfg.out).items() if k.endswith("lora_A.weight")}
    # the oracle: fim_rank_pattern called directly with the same calibration batches and settings
    model = load_model(tiny, dtype=torch.float32, device="cpu")
    data = prepare_data(cfg, load_tokenizer(tiny), need_calibration=True)
    expected = fim_rank_pattern(model, data.calibration, rank=4, passes=2, seed=cfg.seed, statistic="variance",
                                r_min=2, r_max=6)
    assert ranks == expected and max(ranks.values()) <= 6 and min(ranks.values()) >= 2
    with pytest.raises(ValueError, match="--fim-r-max >= --fim-r-min"):
        TrainConfig(model="m", fim_r_min=4, fim_r_max=3)


def test_cka_deviation_is_recorded(cfg):
    main(replace(cfg, method="cka", max_steps=1))
    record = json.loads((Path(cfg.out) / "selection.json").read_text())
    assert "random cut point" in record["deviations"] and "last token" in record["deviations"]


def test_kaiming_rows_are_a_sqrt3_shorter_and_match_init_norm_fixes_it(tiny, cfg):
    model = load_model(tiny, dtype=torch.float32, device="cpu")
    inject_lora(model, [0, 1], rank=4, stiefel=False, seed=0)
    rows = torch.cat([m.lora_A.norm(dim=1) for m in lora_modules(model).values()])
    assert rows.mean().item() == pytest.approx(1 / math.sqrt(3), rel=0.15)   # U(±1/√d_in): E‖row‖² = 1/3
    assert unit_row_norms(model) == 10
    rows = torch.cat([m.lora_A.norm(dim=1) for m in lora_modules(model).values()])
    torch.testing.assert_close(rows, torch.ones_like(rows))
    # in a run: plain A's start at unit rows (lr tiny, one step), the ablation's Stiefel A's stay on the manifold
    for method, flag, expected in (("lora", True, 1.0), ("lora", False, 1 / math.sqrt(3)), ("fora", True, 1.0)):
        out = Path(cfg.out) / f"{method}-{flag}"
        main(replace(cfg, method=method, match_init_norm=flag, lr=1e-9, max_steps=1, out=str(out),
                     stiefel_factor="A", stiefel_lr=1e-9))
        norms = torch.cat([v.norm(dim=1) for k, v in _adapter(out).items() if k.endswith("lora_A.weight")])
        assert norms.mean().item() == pytest.approx(expected, rel=0.15 if not flag else 1e-4), (method, flag)


def test_accumulated_steps_see_the_rows_of_the_large_batch(tiny, tmp_path):
    # Rows of many lengths over several steps and an epoch boundary: length grouping must pick each
    # step's rows at the step's size (micro x accumulation), so both runs read the same rows.
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Is it" + " very" * ((7 * i) % 11) + " even?", "input": "",
                                 "output": "yes" if i % 2 else "no"} for i in range(22)]))
    base = TrainConfig(model=str(tiny), data=str(data), method="fora", k=2, rank=4, device="cpu", val_size=4,
                       max_steps=6, warmup_steps=0, lr=1e-2, log_every=1, eval_every=0, save_every=0,
                       lora_dropout=0.0, fisher_batches=2)
    runs = {}
    for name, bs, accum in (("big", 4, 1), ("accum", 2, 2), ("accum4", 1, 4)):
        main(replace(base, batch_size=bs, grad_accum=accum, out=str(tmp_path / name)))
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        runs[name] = (losses, _adapter(tmp_path / name))
    big_losses, big = runs["big"]
    assert len(big_losses) == 6  # 18 training rows: 5 steps an epoch, so step 6 is in epoch 2
    for name in ("accum", "accum4"):
        losses, adapter = runs[name]
        assert losses == pytest.approx(big_losses, rel=1e-5)
        for k in big:
            torch.testing.assert_close(adapter[k], big[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fora", "random-k", "lora"])
def test_every_selected_layer_receives_gradient(tiny, tmp_path, data_file, monkeypatch, method):
    # The backward is cut below the lowest adapted layer (grad_from_layer); starting it one layer
    # too high would leave that layer's adapters without gradient. At step 1 the plain methods have
    # B = 0, so every B has a gradient s·G (x Aᵀ); FoRA has g = 0, so every gate has one. From
    # step 2 on every parameter has one.
    grads: list[dict[str, torch.Tensor | None]] = []
    modules: dict[int, str] = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, *args, **kwargs):
        params = list(params)
        grads.append({modules[id(p)]: p.grad for p in params})
        return real_clip(params, *args, **kwargs)

    real_build = fora.training.run.build_optimizers

    def build(model, *args, **kwargs):
        for name, m in lora_modules(model).items():
            modules[id(m.lora_A)], modules[id(m.lora_B)] = f"{name}.A", f"{name}.B"
            if m.lora_gate is not None:
                modules[id(m.lora_gate)] = f"{name}.g"
        return real_build(model, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(fora.training.run, "build_optimizers", build)
    cfg = TrainConfig(model=str(tiny), data=str(data_file), method=method, k=2, rank=4, device="cpu", val_size=8,
                      batch_size=4, max_steps=2, warmup_steps=0, lr=1e-2, log_every=1, eval_every=0, save_every=0,
                      lora_dropout=0.0, fisher_batches=2, seed=0, out=str(tmp_path / "run"))
    result = main(cfg)
    expected_layers = result.selected if method != "lora" else list(range(L))
    assert sorted({int(name.split(".")[2]) for name in modules.values()}) == expected_layers
    for step, seen in enumerate(grads, start=1):
        for name, g in seen.items():
            if name.endswith(".g" if METHODS[method].stiefel else ".B") or step > 1:
                assert g is not None and float(g.abs().sum()) > 0, f"{name} got no gradient at step {step}"


@pytest.mark.parametrize("per_micro_batch, expected", [(False, 1), (True, 2)])
def test_cayley_adam_steps_once_per_optimizer_step_unless_asked_per_micro_batch(cfg, monkeypatch,
                                                                                 per_micro_batch, expected):
    """Default: after accumulation and clipping, once per step; the authors' trainer's stepping
    (--cayley-per-micro-batch): after every micro-batch's backward, before clipping."""
    from fora.cayley_adam import CayleyAdam

    events: list[str] = []
    real_step, real_clip = CayleyAdam.step, torch.nn.utils.clip_grad_norm_

    def step(self, *a, **kw):
        events.append("cayley")
        return real_step(self, *a, **kw)

    def clip(*a, **kw):
        events.append("clip")
        return real_clip(*a, **kw)
    monkeypatch.setattr(CayleyAdam, "step", step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    main(replace(cfg, grad_accum=2, max_steps=2, cayley_per_micro_batch=per_micro_batch))
    assert events.count("cayley") == 2 * expected
    steps = [events[i:i + expected + 1] for i in range(0, len(events), expected + 1)]
    order = ["cayley"] * expected + ["clip"] if per_micro_batch else ["clip", "cayley"]
    assert steps == [order, order]


def test_the_ablation_runs_end_to_end_with_a_on_the_manifold(cfg):
    from fora.stiefel import stiefel_error

    main(replace(cfg, stiefel_factor="A", max_steps=3))
    tensors = _adapter(cfg.out)
    assert max(stiefel_error(A, rows=True) for k, A in tensors.items() if k.endswith("lora_A.weight")) < 1e-5
    assert not any("gate" in k for k in tensors)


def test_factor_flags_are_checked():
    with pytest.raises(ValueError, match="unknown --stiefel-factor 'C'; choose B .FoRA. or A"):
        TrainConfig(model="m", stiefel_factor="C")
    with pytest.raises(ValueError, match="--cayley-per-micro-batch reproduces the authors' trainer, which constrains B"):
        TrainConfig(model="m", stiefel_factor="A", cayley_per_micro_batch=True)
    parsed = parse_args(["--model", "m", "--stiefel-factor", "A"])
    assert (parsed.stiefel_factor, parsed.cayley_per_micro_batch) == ("A", False)
