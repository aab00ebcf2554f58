"""Crash-safe file and directory writes.

A training run can be killed at any instant (pre-emption, OOM killer, Ctrl-C). Every file fora
writes therefore goes through one of these helpers: the bytes land in a temporary file in the
*same* directory (so the final rename never crosses a filesystem), are fsync'ed, and replace the
target with `os.replace`, which POSIX guarantees to be atomic. A reader sees the old file or the
new one, never half of either.

Directories (a checkpoint, a merged model) are built in a staging directory next to the target
and swapped in with two renames; `recover_dir` repairs the one window in which a crash leaves the
target missing (the previous version is then still on disk under `<name>.old`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

_OLD_SUFFIX = ".old"
_STAGING_PREFIX = ".staging-"


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse to open a directory: best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # The only portable way to read the umask is to set it; restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: str | os.PathLike | int, *, directory: bool) -> None:
    """mkstemp / mkdtemp create owner-only files (0600 / 0700); give the final file the mode a
    plain `open` would (0644 / 0755 under umask 0022) so that others can read a run's outputs."""
    mode = (0o777 if directory else 0o666) & ~_umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same dir + fsync + os.replace)."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to stream into; on normal exit it replaces `path` atomically (fsync + os.replace),
    on an exception it is deleted and `path` is untouched. For files too large to build in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _honour_umask(fd, directory=False)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented, key-sorted JSON atomically (trailing newline included)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Save `tensors` in safetensors format atomically.

    Tensors are made contiguous and detached from each other first (safetensors refuses shared
    storage, e.g. a tied embedding).
    """
    from safetensors.torch import save

    counts: dict[int, int] = {}
    for v in tensors.values():
        ptr = v.untyped_storage().data_ptr()
        counts[ptr] = counts.get(ptr, 0) + 1
    clean = {k: (v.detach().clone() if counts[v.untyped_storage().data_ptr()] > 1
                 else v.detach()).contiguous().cpu() for k, v in tensors.items()}
    data = save(clean, metadata=dict(metadata) if metadata else None)
    return atomic_write_bytes(path, data)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to `path` atomically."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def recover_dir(path: str | os.PathLike) -> Path:
    """Finish an interrupted `publish_dir`: if `path` is missing but `path.old` exists, restore it.

    Also removes stale staging directories left by a killed writer. Returns `path`.
    """
    path = Path(path)
    old = path.with_name(path.name + _OLD_SUFFIX)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    elif path.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if path.parent.is_dir():
        for stale in path.parent.glob(f"{_STAGING_PREFIX}{path.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return path


def publish_dir(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace directory `final` by the fully written directory `staged` (same parent).

    `rename(2)` cannot replace a non-empty directory, so the old version is first renamed to
    `final.old`, the new one renamed into place, then the old one deleted. A crash between the
    two renames leaves `final.old` intact, which `recover_dir` puts back.
    """
    staged, final = Path(staged), Path(final)
    old = final.with_name(final.name + _OLD_SUFFIX)
    if old.exists():  # left by an earlier crash; `staged` is newer than either copy
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Context manager: yields an empty directory next to `final`; on normal exit it replaces
    `final` atomically (`publish_dir`); on an exception it is deleted and `final` is untouched.

    Files written inside should still be fsync'ed (the atomic_* helpers do it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{final.name}-", dir=final.parent))
    try:
        _honour_umask(staged, directory=True)
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish_dir(staged, final)
