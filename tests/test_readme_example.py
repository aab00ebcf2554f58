"""The README's "Use it from your own trainer" block, run as written (offline, on the packaged
SmolLM2-135M through transformers).

The code is read out of README.md, so the README cannot drift from the API. Oracles: peft loads
the adapter the block writes and gives the logits of the trained model; the base weights are the
checkpoint's; every B is on the Stiefel manifold; the printed loss falls.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


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


@pytest.mark.slow
def test_readme_example_trains_and_writes_a_peft_adapter(tmp_path, monkeypatch, capsys):
    import fora
    import peft
    import transformers

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), str(README) + ":example", "exec"), scope)
    model, batches, layers, folder = scope["model"], scope["batches"], scope["layers"], scope["folder"]

    losses = [float(line.rsplit(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("epoch ")]
    assert len(losses) == 4 and losses[-1] < losses[0]         # the printed loss falls
    assert layers == sorted(layers) and len(layers) == model.config.num_hidden_layers // 2
    assert fora.adapted_layers(model) == layers
    for B in fora.stiefel_parameters(model, factor="B"):
        assert fora.stiefel_error(B) < 1e-5  # BᵀB = I after training (Eq. 4)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
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
