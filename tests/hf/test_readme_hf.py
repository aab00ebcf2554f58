"""The README's "From the Hugging Face stack" block, run as written on a tiny random LLaMA checkpoint
(``fora.resolve_checkpoint`` answers with it instead of SmolLM2).

Oracles: the config's layers are the only adapted ones, every B is on the Stiefel manifold, the
written file has no gate, and peft loads it on a fresh base with the trained model's logits.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from hf_helpers import base_model
from safetensors.torch import load_file

import fora
import fora.hf

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## From the Hugging Face stack"


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no section {SECTION!r}; this test runs its code"
    match = re.search(r"```python\n(.*?)```", text.split(SECTION, 1)[1].split("\n## ", 1)[0], re.S)
    assert match, f"README.md's section {SECTION!r} has no ```python block"
    return match.group(1)


def test_readme_hf_block_trains_with_sft_trainer_and_writes_a_peft_adapter(checkpoints, tmp_path, monkeypatch):
    import peft

    folder = checkpoints["llama"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fora, "resolve_checkpoint", lambda name: folder)
    scope: dict = {}
    exec(compile(readme_block(), f"{README}:hf-example", "exec"), scope)
    model, config, trainer, optimizer = scope["model"], scope["config"], scope["trainer"], scope["optimizer"]

    assert trainer.state.global_step == 4
    layers = fora.hf.fora_layers(model)
    assert sorted({fora.models.paths.layer_index(n) for n in layers}) == config.layers_to_transform
    for m in layers.values():
        B = m.lora_B["default"].weight
        assert fora.stiefel_error(B.detach()) < 1e-5 and optimizer.cayley.state[B]["step"] == 4
    assert not [k for k in load_file(tmp_path / "fora-adapter" / "adapter_model.safetensors") if "gate" in k]

    ids = torch.randint(4, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(base_model(folder), tmp_path / "fora-adapter").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, tuned, atol=1e-5, rtol=1e-5)
