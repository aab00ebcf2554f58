"""The README's "Use it from your own trainer" block, run as written on a tiny transformers model.

The code is read out of README.md, so the README cannot drift from the API. Hub downloads are
redirected to a tiny random LLaMA checkpoint (tests/tiny_models.py); everything else runs
unchanged. Oracles: peft loads the adapter the block writes and gives the logits of the trained
model; the base weights are the checkpoint's; every A is on the Stiefel manifold.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it from your own trainer"


def readme_example() -> str:
    """The first ```python block of the README section SECTION."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no section {SECTION!r}; the example test reads its code from there"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README.md's section {SECTION!r} has no ```python block"
    return match.group(1)


@pytest.fixture()
def tiny_hub(tmp_path, monkeypatch):
    """transformers' from_pretrained of any name loads the tiny checkpoint instead."""
    transformers = pytest.importorskip("transformers")
    folder = make_tiny_checkpoint(tmp_path / "tiny", "llama", num_hidden_layers=4)
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained",
                            classmethod(lambda c, name, *a, _o=original, **kw: _o(c, str(folder), *a, **kw)))
    monkeypatch.chdir(tmp_path)
    return folder


def test_readme_example_trains_and_writes_a_peft_adapter(tiny_hub, tmp_path):
    import fora
    import peft
    import transformers

    scope: dict = {}
    exec(compile(readme_example(), str(README) + ":example", "exec"), scope)
    model, batches, layers = scope["model"], scope["batches"], scope["layers"]

    assert layers == sorted(layers) and len(layers) == 2  # top-K of 4 layers, K = L // 2
    assert fora.adapted_layers(model) == layers
    for A in fora.stiefel_parameters(model):
        assert fora.stiefel_error(A.mT) < 1e-5  # A Aᵀ = I after training (Eq. 4)
    reference = transformers.AutoModelForCausalLM.from_pretrained("base", dtype=torch.float32).eval()
    ref_state = reference.state_dict()
    for name, p in model.named_parameters():  # the base stayed frozen: only lora_* tensors moved
        if "lora_" not in name:
            assert torch.equal(p.detach(), ref_state[name.replace(".base_layer", "")]), name

    model.eval()
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask).logits
        base = reference(input_ids=ids, attention_mask=mask).logits
        loaded = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
        via_peft = loaded(input_ids=ids, attention_mask=mask).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter learned something
    torch.testing.assert_close(via_peft, tuned, atol=1e-4, rtol=1e-4)
