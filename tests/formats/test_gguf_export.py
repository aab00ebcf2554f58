"""GGUF export (fora.formats.gguf_writer / gguf_model / gguf_export, scripts/export.py), without llama.cpp.

Oracles: fora's own GGUF reader (an independent parser of the file) for the round trip; the `gguf`
package's GGUFReader and its quantizers for the layout and the tensor encodings; fora's LoRA modules'
own `scale` for the adapter scale folding. llama.cpp itself checks the files in test_llama_cpp.py.
"""
from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
import torch
from gguf_runs import make_run
from safetensors.torch import load_file
from tiny_models import make_tiny_checkpoint

from fora.formats.gguf import convert_gguf
from fora.formats.gguf_export import export_gguf
from fora.formats.gguf_names import permute_rows
from fora.formats.gguf_reader import read_gguf
from fora.formats.gguf_vocab import gguf_vocab
from fora.formats.gguf_writer import encode_tensor, export_adapter_gguf, write_gguf
from fora.formats.loading import load_model
from fora.formats.tokenizer import tokenizer_from_folder, tokenizer_from_gguf
from fora.inject import lora_modules
from script_loader import load_script

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread_module")
IDS = torch.tensor([[2, 10, 20, 30, 40, 50, 60, 70]])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {fam: make_tiny_checkpoint(root / fam, fam) for fam in ("llama", "qwen3", "gemma3")}


@pytest.mark.parametrize("fam", ["llama", "qwen3", "gemma3"])
def test_model_gguf_round_trips_through_fora_reader(bases, tmp_path, fam):
    out = export_gguf(bases[fam], to="gguf", dtype="f32", out=tmp_path / "m.gguf").path
    back = convert_gguf(out, tmp_path / "back")
    a, b = load_file(bases[fam] / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b)
    for name, w in a.items():
        if fam == "gemma3" and name.endswith("norm.weight"):
            # stored as the gain 1 + w: (w + 1) - 1 in float32 is exact up to one ulp of 1 + w
            torch.testing.assert_close(b[name], w, rtol=0, atol=2.0 ** -23 * float((w + 1).abs().max()))
        else:
            assert torch.equal(b[name], w), name
    with torch.no_grad():
        ref = load_model(bases[fam], dtype=torch.float32, device="cpu")(IDS)
        got = load_model(back, dtype=torch.float32, device="cpu")(IDS)
    if fam == "gemma3":
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    else:
        assert torch.equal(got, ref)
    cfg_a, cfg_b = (json.loads((p / "config.json").read_text()) for p in (bases[fam], back))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert cfg_b[key] == cfg_a[key], key


def test_model_gguf_metadata_and_tokenizer(bases, tmp_path):
    out = export_gguf(bases["llama"], to="gguf", dtype="f16", out=tmp_path / "m.gguf").path
    r = gguf.GGUFReader(out)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.type") == "model"
    assert field("llama.block_count") == 2 and field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16 and field("general.file_type") == 1
    assert len(field("tokenizer.ggml.tokens")) == 128  # padded to the embedding rows
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    # the vocabulary read back by fora's GGUF tokenizer encodes text as the checkpoint's own does
    tok, _, _ = tokenizer_from_gguf(read_gguf(out).metadata)
    text = "Hello, world!\n  2 + 3 = 5"
    assert tok.encode(text, add_special_tokens=False).ids == \
        tokenizer_from_folder(bases["llama"]).tokenizer.encode(text, add_special_tokens=False).ids


def test_tensor_encodings_match_the_gguf_package():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :32] = 0  # an all-zero block: scale 0
    for kind, qtype in (("q8_0", "Q8_0"), ("bf16", "BF16"), ("f16", "F16")):
        ggml_type, raw = encode_tensor(x, kind)
        want = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype])
        assert ggml_type == int(gguf.GGMLQuantizationType[qtype]) and raw == want.tobytes(), kind
    assert encode_tensor(x[0], "q8_0") == (0, x[0].numpy().tobytes())  # 1-D stays f32
    assert encode_tensor(torch.ones(2, 48), "q8_0")[0] == 1  # rows not a multiple of 32: f16


@pytest.mark.parametrize("variant", ["plain", "rslora", "fim"])
def test_adapter_gguf_layout_and_scale_folding(bases, tmp_path, variant):
    run, model = make_run(tmp_path, bases["llama"], variant)
    out = export_gguf(run, to="gguf-lora", dtype="f32", out=tmp_path / "a.gguf").path
    r = gguf.GGUFReader(out)
    meta = {k: r.fields[k].contents() for k in ("general.type", "adapter.type", "general.architecture",
                                                "adapter.lora.alpha")}
    assert meta == {"general.type": "adapter", "adapter.type": "lora", "general.architecture": "llama",
                    "adapter.lora.alpha": 8.0}
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    modules = lora_modules(model)
    assert len(tensors) == 2 * len(modules)
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for path, m in modules.items():
        name = f"blk.{path.split('.')[2]}.{short[path.rsplit('.', 1)[-1]]}.weight"
        A, B = (torch.from_numpy(tensors[f"{name}.lora_{x}"]) for x in "ab")
        assert A.shape == (m.rank, m.in_features) and B.shape == (m.out_features, m.rank)
        # llama.cpp adds (alpha / r) B A; it must equal fora's g s B A, q/k rows in llama.cpp's order
        want = m.delta_weight().detach()
        if name.endswith("attn_q.weight"):
            want = permute_rows(want, 4)
        elif name.endswith("attn_k.weight"):
            want = permute_rows(want, 2)
        torch.testing.assert_close(8.0 / m.rank * B @ A, want, rtol=1e-5, atol=1e-6)


def test_merged_gguf_carries_w0_plus_delta(bases, tmp_path):
    run, model = make_run(tmp_path, bases["qwen3"], "plain")
    merged = convert_gguf(export_gguf(run, to="merged", dtype="f32", out=tmp_path / "m.gguf").path,
                          tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged, dtype=torch.float32, device="cpu")(IDS), model(IDS),
                                   rtol=0, atol=1e-5)


def test_vocab_of_single_characters_is_bpe_without_merges(bases):
    meta = gguf_vocab(bases["llama"], "llama", 128)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.merges"] == []
    assert meta["tokenizer.ggml.tokens"][4 + 94] == "Ġ" and meta["tokenizer.ggml.bos_token_id"] == 2
    with pytest.raises(ValueError, match="has 100 tokens but the model only 64 embedding rows"):
        gguf_vocab(bases["llama"], "llama", 64)


# ----------------------------------------------------------------------------- bad input

def test_unknown_architecture_is_refused(bases, tmp_path):
    run, _ = make_run(tmp_path, bases["llama"], "plain")
    with pytest.raises(ValueError, match="does not know architecture 'mistral'"):
        export_adapter_gguf(run, {"model_type": "mistral", "num_attention_heads": 4}, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_dora_adapter_is_refused_naming_merged(bases, tmp_path):
    run, _ = make_run(tmp_path, bases["llama"], "dora")
    with pytest.raises(ValueError, match=r"DoRA adapter.*--to merged"):
        export_gguf(run, to="gguf-lora", out=tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_gemma_attention_scale_llama_cpp_cannot_express_is_refused(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "g2", "gemma2")  # query_pre_attn_scalar 24, head_dim 16
    with pytest.raises(ValueError, match=r"fixes the attention scale to 1/sqrt\(16\)"):
        export_gguf(base, to="gguf", out=tmp_path / "g2.gguf")
    assert not list(tmp_path.glob("g2.gguf*"))


def test_run_folder_without_adapter_is_refused(bases, tmp_path):
    for to in ("gguf-lora", "merged"):
        with pytest.raises(FileNotFoundError, match="holds no adapter"):
            export_gguf(tmp_path, to=to)


def test_unwritable_out_is_refused_before_any_work(bases, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="is not a writable directory"):
        export_gguf(bases["llama"], to="gguf", out=tmp_path / "file" / "m.gguf")
    with pytest.raises(ValueError, match="is a directory"):
        export_gguf(bases["llama"], to="gguf", out=tmp_path)


def test_failed_write_leaves_no_partial_file(tmp_path):
    class Boom(torch.Tensor):
        pass

    good = torch.zeros(2, 32)
    bad = torch.zeros(2, 32).as_subclass(Boom)
    bad.detach = lambda: (_ for _ in ()).throw(RuntimeError("disk full"))  # fails mid-stream
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(tmp_path / "x.gguf", {"general.architecture": "llama"}, [("a", good, "f32"), ("b", bad, "f32")])
    assert list(tmp_path.iterdir()) == []


def test_bad_type_and_target_are_one_line_errors(bases, tmp_path):
    with pytest.raises(ValueError, match="--type 'q8_0' is not supported for --to gguf-lora"):
        export_gguf(bases["llama"], to="gguf-lora", dtype="q8_0")
    with pytest.raises(ValueError, match="--to 'onnx' is not an export"):
        export_gguf(bases["llama"], to="onnx")


def test_export_script_prints_size_count_and_how_to_run(bases, tmp_path, capsys):
    run, _ = make_run(tmp_path, bases["llama"], "plain")
    script = load_script("export")
    assert script.cli([str(run), "--to", "gguf-lora"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(read_gguf(run / "adapter-f16.gguf").tensors)
    assert n == 28 and lines[0].startswith(f"wrote {run / 'adapter-f16.gguf'} (") and f"{n} tensors, f16" in lines[0]
    # the base GGUF is not there yet: the line starts with the export that writes it, runnable as printed
    serve = f"llama-cli -m {run / 'base-f16.gguf'} --lora {run / 'adapter-f16.gguf'}"
    write_base = f"python scripts/export.py {run} --to gguf --type f16"
    assert lines[1].startswith(f"run it: {write_base} && {serve}   (the first command writes the base model")
    capsys.readouterr()
    assert script.cli(shlex.split(write_base)[2:]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {run / 'base-f16.gguf'} (")
    assert script.cli([str(run), "--to", "gguf-lora"]) == 0      # now the base is there: just the server
    assert capsys.readouterr().out.splitlines()[1] == f"run it: {serve}"
    assert script.cli([str(run), "--to", "gguf-lora", "--out", str(tmp_path / "a.gguf")]) == 0
    assert f"--type f16 --out {tmp_path / 'base-f16.gguf'} && llama-cli -m {tmp_path / 'base-f16.gguf'} --lora " \
           f"{tmp_path / 'a.gguf'}" in capsys.readouterr().out
    assert script.cli([str(tmp_path / "nothing"), "--to", "merged"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("export.py: error:") and "holds no adapter" in err and "\n" not in err
    assert math.isclose((run / "adapter-f16.gguf").stat().st_size / 1e6, float(lines[0].split("(")[1].split()[0]),
                        abs_tol=0.05)


def test_gemma3_without_sliding_layers_has_window_zero(tmp_path):
    # llama.cpp aborts on a sliding window with no sliding layer; fora's reader reads it back as all-full
    base = make_tiny_checkpoint(tmp_path / "g3", "gemma3", layer_types=["full_attention"] * 6)
    out = export_gguf(base, to="gguf", dtype="f32", out=tmp_path / "g3.gguf").path
    meta = read_gguf(out).metadata
    assert meta["gemma3.attention.sliding_window"] == 0
    assert meta["gemma3.attention.sliding_window_pattern"] == [False] * 6
    back = json.loads((convert_gguf(out, tmp_path / "back") / "config.json").read_text())
    assert back["layer_types"] == ["full_attention"] * 6


def test_adalora_run_exports_its_plain_lora_twin(bases, tmp_path):
    import shutil

    plain, _ = make_run(tmp_path, bases["llama"], "plain")
    run = tmp_path / "adalora-run"  # an AdaLoRA run: its own adapter, the folded plain form in lora/
    shutil.copytree(plain, run / "lora")
    shutil.copy(plain / "adapter_model.safetensors", run)
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "ADALORA", "lora_alpha": 8,
                                                         "base_model_name_or_path": str(bases["llama"])}))
    got = export_gguf(run, to="gguf-lora", dtype="f32", out=tmp_path / "a.gguf").path
    want = export_gguf(plain, to="gguf-lora", dtype="f32", out=tmp_path / "b.gguf").path
    tensors = [{t.name: np.array(t.data) for t in gguf.GGUFReader(p).tensors} for p in (got, want)]
    assert tensors[0].keys() == tensors[1].keys()
    assert all(np.array_equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    shutil.rmtree(run / "lora")
    with pytest.raises(ValueError, match="peft_type 'ADALORA' has no plain-LoRA form"):
        export_gguf(run, to="gguf-lora", out=tmp_path / "c.gguf")
