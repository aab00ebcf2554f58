"""fora.hf.FoRAOptimizer inside transformers.Trainer and TRL's SFTTrainer, on the CPU.

Oracles: the base weights (unchanged), peft's module names (only the selected layers move), BᵀB = I,
the Trainer's own global_step (Cayley-Adam steps once per optimizer step), a batch of 4 against two
accumulated micro-batches of 2 (the same optimizer steps), an uninterrupted run against one resumed
from the Trainer's checkpoint (bit-identical), and the schedule's lr per step (AdamW only).
"""
from __future__ import annotations

import pytest
import torch
from hf_helpers import FAMILIES, TEXTS, adapter_state, base_model, examples, fora_model, training_args

import fora
import fora.hf


def _train(model, out, data=None, optimizer=None, callbacks=(), resume=None, **overrides):
    from transformers import Trainer

    opt = optimizer or fora.hf.FoRAOptimizer(model, lr=1e-2)
    trainer = Trainer(model=model, args=training_args(out, **overrides), train_dataset=data or examples(),
                      optimizers=(opt, None), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, opt


def _moved(before: dict, after: dict) -> set[str]:
    return {n for n in before if not torch.equal(before[n], after[n])}


def _check_trained(model, base_state, before, global_step, opt) -> None:
    layers = fora.hf.fora_layers(model)
    selected = {fora.models.paths.layer_index(n) for n in layers}
    after = adapter_state(model)
    moved = _moved(before, after)
    assert moved == set(before)                       # every A, B and gate moved ...
    assert {fora.models.paths.layer_index(n) for n in moved} == selected   # ... in the selected layers only
    for name, p in model.get_base_model().state_dict().items():  # the base did not move
        if "lora_" not in name:
            assert torch.equal(p, base_state[name.replace(".base_layer", "")]), name
    for m in layers.values():
        B = m.lora_B["default"].weight
        assert fora.stiefel_error(B.detach()) < 1e-5                     # BᵀB = I (Eq. 4)
        assert opt.cayley.state[B]["step"] == global_step                # one Cayley-Adam step per step


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_trains_the_selected_layers_only_and_keeps_b_orthonormal(checkpoints, family, tmp_path):
    model = fora_model(checkpoints[family])
    base_state = base_model(checkpoints[family]).state_dict()
    before = adapter_state(model)
    trainer, opt = _train(model, tmp_path, max_grad_norm=0.5)
    assert trainer.state.global_step == 3
    _check_trained(model, base_state, before, 3, opt)


def test_sft_trainer_trains_the_selected_layers_only_and_keeps_b_orthonormal(checkpoints, tmp_path):
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder = checkpoints["qwen3"]
    model = fora_model(folder)
    base_state = base_model(folder).state_dict()
    before = adapter_state(model)
    opt = fora.hf.FoRAOptimizer(model, lr=1e-2)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                     logging_strategy="no", max_steps=3, per_device_train_batch_size=4, max_length=32, bf16=False,
                     gradient_accumulation_steps=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS * 2}),
                         processing_class=AutoTokenizer.from_pretrained(folder), optimizers=(opt, None))
    trainer.train()
    assert trainer.state.global_step == 3
    _check_trained(model, base_state, before, 3, opt)


def test_accumulating_two_micro_batches_of_2_equals_one_batch_of_4(checkpoints, tmp_path):
    states = []
    for batch, accumulate in ((4, 1), (2, 2)):
        model = fora_model(checkpoints["llama"])
        trainer, opt = _train(model, tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accumulate, max_steps=4, max_grad_norm=1.0)
        B = next(iter(fora.hf.fora_layers(model).values())).lora_B["default"].weight
        assert opt.cayley.state[B]["step"] == trainer.state.global_step == 4
        states.append(adapter_state(model))
    big, accumulated = states
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-5, rtol=1e-4, msg=name)


def test_cayley_adam_steps_on_the_accumulated_clipped_gradient(checkpoints, tmp_path):
    model = fora_model(checkpoints["llama"])
    opt = fora.hf.FoRAOptimizer(model, lr=1e-2)
    seen, cayley_step = [], opt.cayley.step

    def step(*args, **kwargs):  # the norm of every gradient at the moment Cayley-Adam steps
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return cayley_step(*args, **kwargs)

    opt.cayley.step = step
    trainer, _ = _train(model, tmp_path, optimizer=opt, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                        max_steps=3, max_grad_norm=1e-3)
    assert len(seen) == trainer.state.global_step == 3
    assert all(norm <= 1e-3 * (1 + 1e-4) for norm in seen), seen   # clipped, then stepped


def test_resuming_from_a_trainer_checkpoint_equals_the_uninterrupted_run(checkpoints, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear", warmup_steps=1,
                  max_grad_norm=1.0)
    model = fora_model(checkpoints["qwen3"])
    _train(model, tmp_path / "run", **common)
    uninterrupted = adapter_state(model)

    resumed = fora_model(checkpoints["qwen3"], seed=1)   # other draws: the checkpoint must supply everything
    _train(resumed, tmp_path / "again", resume=str(tmp_path / "run" / "checkpoint-2"), **common)
    after = adapter_state(resumed)
    assert set(after) == set(uninterrupted)
    assert not [n for n in after if not torch.equal(after[n], uninterrupted[n])]


def test_the_schedule_moves_adamw_only(checkpoints, tmp_path):
    from transformers import TrainerCallback

    lrs = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            lrs.append((optimizer.param_groups[0]["lr"], optimizer.optimizer.cayley.param_groups[0]["lr"],
                        lr_scheduler.get_last_lr()[0]))

    model = fora_model(checkpoints["llama"])
    _train(model, tmp_path, optimizer=fora.hf.FoRAOptimizer(model, lr=1e-2), callbacks=[Record()],
           lr_scheduler_type="linear", warmup_steps=2, max_steps=5)
    adamw, cayley, scheduled = zip(*lrs)
    assert adamw == scheduled and len(set(adamw)) == 5        # AdamW follows warm-up and decay
    assert cayley == (1e-3,) * 5                                # Cayley-Adam keeps its constant cap
