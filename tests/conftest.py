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
    """One GGUF conversion cache for the whole session (FORA_CACHE, unless the caller set one to
    keep), so each packaged checkpoint is converted once per run and never into the user's cache."""
    if os.environ.get("FORA_CACHE"):
        yield Path(os.environ["FORA_CACHE"])
        return
    root = tmp_path_factory.getbasetemp() / "fora-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORA_CACHE", str(root))
        yield root
    shutil.rmtree(root, ignore_errors=True)
