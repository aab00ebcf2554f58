"""inject_lora on fora.models.decoder.CausalLM: paths, counts (the paper's Table 1), guards, collection."""
import pytest
import torch
from torch import nn

from fora.models.config import ModelConfig
from fora.inject import (adapted_layers, count_trainable, euclidean_parameters, freeze_base,
                         inject_lora, lora_modules, stiefel_parameters)
from fora.lora import LoRALinear
from fora.models.decoder import CausalLM
from fora.optim import build_optimizers
from fora.stiefel import stiefel_error

LLAMA_32_1B = {  # config.json of meta-llama/Llama-3.2-1B (the fields the shapes depend on)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001,
}
TINY = {**LLAMA_32_1B, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64}


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_llama_1b():
    with torch.device("meta"):
        return CausalLM(ModelConfig.from_dict(LLAMA_32_1B))


def tiny(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig.from_dict(TINY)).eval()


def expected_count(cfg, layers, r):
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    per_layer = (h + q) + (h + kv) + (h + kv) + (h + i) + (i + h)    # Σ_m (d_in + d_out), 5 targets
    return r * per_layer * len(layers)


@pytest.mark.parametrize("layers, paper_millions", [(range(16), 15.2), (range(0, 16, 2), 7.6)])
def test_llama_3_2_1b_trainable_counts_match_table_1(layers, paper_millions):
    model = meta_llama_1b()
    mods = inject_lora(model, layers, rank=32)
    freeze_base(model)
    n = count_trainable(model)
    assert n == expected_count(LLAMA_32_1B, layers, 32) + len(mods)   # + one scalar gate per module
    assert round(n / 1e6, 1) == paper_millions
    assert len(mods) == 5 * len(layers) and adapted_layers(model) == list(layers)


def test_paths_shared_weights_and_state_dict_keys():
    model = tiny()
    before = {k: v for k, v in model.state_dict().items()}
    q0 = model.model.layers[1].self_attn.q_proj
    mods = inject_lora(model, [1, 2], rank=4, seed=0)
    assert list(mods) == [f"model.layers.{i}.{p}.{t}" for i in (1, 2) for p, t in
                          [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                           ("mlp", "up_proj"), ("mlp", "down_proj")]]
    for path, m in mods.items():
        assert model.get_submodule(path) is m and isinstance(m, LoRALinear)
    assert mods["model.layers.1.self_attn.q_proj"].weight is q0.weight
    after = model.state_dict()
    assert set(before) <= set(after)
    assert {k.rsplit(".", 1)[-1] for k in set(after) - set(before)} == {"lora_A", "lora_B", "lora_gate"}
    assert model.lm_head.weight is model.model.embed_tokens.weight     # tying untouched
    assert lora_modules(model) == mods


def test_injected_model_with_zero_B_gives_the_base_logits():
    model = tiny()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        inject_lora(model, [0, 2], targets=("q_proj", "o_proj", "gate_proj", "down_proj"), rank=4)
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)


def test_alpha_default_rank_pattern_and_seed():
    model = tiny()
    pattern = {"model.layers.0.mlp.up_proj": 8, "model.layers.1.self_attn.k_proj": 2}
    mods = inject_lora(model, [0, 1], rank=4, rank_pattern=pattern, seed=3)
    assert mods["model.layers.0.mlp.up_proj"].rank == 8
    assert mods["model.layers.1.self_attn.k_proj"].rank == 2
    assert mods["model.layers.0.self_attn.q_proj"].rank == 4
    assert {m.alpha for m in mods.values()} == {8.0}                  # alpha = 2 · rank, shared
    assert mods["model.layers.0.mlp.up_proj"].scale == 1.0            # α / r_m, as in peft
    for m in mods.values():
        assert m.init == "stiefel_b" and stiefel_error(m.lora_B.detach()) < 1e-5 and float(m.lora_gate) == 0
    ablation = inject_lora(tiny(), [0], rank=4, stiefel_factor="A")
    for m in ablation.values():
        assert m.init == "stiefel_a" and stiefel_error(m.lora_A.detach().mT) < 1e-5 and m.lora_gate is None
    again = inject_lora(tiny(), [0, 1], rank=4, rank_pattern=pattern, seed=3)
    assert all(torch.equal(a.lora_A, b.lora_A) for a, b in zip(mods.values(), again.values()))
    plain = inject_lora(tiny(), [0], rank=4, alpha=16, stiefel=False, rslora=True)
    m = plain["model.layers.0.self_attn.q_proj"]
    assert m.init == "standard" and m.scale == 8.0                    # 16 / √4


def test_freeze_collect_and_count():
    model = tiny()
    inject_lora(model, [2], rank=2)
    with pytest.raises(ValueError, match="freeze_base"):
        stiefel_parameters(model, factor="B")
    freeze_base(model)
    B, rest = stiefel_parameters(model, factor="B"), euclidean_parameters(model, factor="B")
    assert [p.shape[1] for p in B] == [2] * 5                           # the (d_out, r) B's
    assert [tuple(p.shape[:1]) for p in rest] == [(2,), ()] * 5         # A (r, d_in), then the gate
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in B + rest}
    assert count_trainable(model) == sum(p.numel() for p in B + rest) == expected_count(TINY, [2], 2) + 5
    assert adapted_layers(model) == [2]


@pytest.mark.parametrize("factor", ["B", "A"])
def test_end_to_end_training_steps_keep_the_factor_on_the_manifold(factor):
    model = tiny()
    inject_lora(model, [1, 2], rank=2, seed=0, stiefel_factor=factor)
    freeze_base(model)
    opts = build_optimizers(model, lr=1e-2, stiefel_factor=factor, stiefel_lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(5):
        for o in opts:
            o.zero_grad()
        logits = model(ids[:, :-1], grad_from_layer=1)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    points = [p.detach() if factor == "B" else p.detach().mT for p in stiefel_parameters(model, factor=factor)]
    assert max(stiefel_error(x) for x in points) < 1e-5


def test_errors():
    with pytest.raises(ValueError, match=r"layer index 3 out of range.*valid indices are 0\.\.2"):
        inject_lora(tiny(), [0, 3])
    with pytest.raises(ValueError, match="out of range"):
        inject_lora(tiny(), [-1])
    with pytest.raises(ValueError, match="no layers"):
        inject_lora(tiny(), [])
    with pytest.raises(ValueError, match=r"no module named 'c_attn' in model.layers.0.*q_proj"):
        inject_lora(tiny(), [0], targets=("c_attn",))
    with pytest.raises(TypeError, match="input_layernorm is a RMSNorm, not an nn.Linear"):
        inject_lora(tiny(), [0], targets=("input_layernorm",))
    with pytest.raises(ValueError, match="rank_pattern names modules that are not injected"):
        inject_lora(tiny(), [0], rank=4, rank_pattern={"model.layers.1.self_attn.q_proj": 4})
    with pytest.raises(ValueError, match="duplicate targets"):
        inject_lora(tiny(), [0], targets=("q_proj", "q_proj"))
    model = tiny()
    inject_lora(model, [0], rank=4)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(model, [0], rank=4)
    with pytest.raises(ValueError, match=r"rank 32 > 16 for a Stiefel B of a 32 -> 16 layer"):
        inject_lora(tiny(), [0])                           # k_proj is 32 -> 16
    with pytest.raises(ValueError, match="unknown stiefel_factor 'C'"):
        inject_lora(tiny(), [0], rank=2, stiefel_factor="C")
    with pytest.raises(ValueError, match="has no decoder blocks at model.model.layers"):
        inject_lora(nn.Linear(2, 2), [0])
