"""`--resume DIR` on the command line, and what an `--out` folder may hold (`prepare_out`).

`--resume DIR` alone continues a run: every setting is read from the checkpoint's
`train_config.json`. Flags given together with it must agree with that file, except the ones that
do not change the trajectory (`RESUMABLE_FIELDS`: --out, --merge, --log-every, ...), which
override it; any other difference is refused with the differing keys named.

An `--out` folder is locked for the run (`OUT/.train.lock`, released when the process ends, even
by `kill -9`), so a second process cannot train into it at the same time. A folder holding an
attempt that stopped before its first checkpoint (a crash, an out-of-memory kill) holds nothing
to continue: a plain rerun, or `--resume` of it, replaces that attempt and says so in the log.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fora.formats.peft_io import ADAPTER_WEIGHTS
from fora.formats.atomic import recover_dir
from fora.training.checkpoint import CONFIG_FILE, STATE_FILE, Checkpoint, find_checkpoint, load_checkpoint

log = logging.getLogger("fora.train")
LOCK_FILE = ".train.lock"  # held by the process training into the folder (`claim_out`)

class _Config(Protocol):
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any: ...


class _RunConfig(_Config, Protocol):
    """What `default_out` / `prepare_out` read of a `TrainConfig` (and `type(cfg).from_dict`)."""

    model: str
    method: str
    k: int | None
    out: str | None
    resume: str | None

    def trajectory_diff(self, other: Any) -> dict[str, tuple[Any, Any]]: ...


# `fora.training.flags.parse_args` calls in here; the config class comes in as an argument so
# that this module does not import config back.
C = TypeVar("C", bound=_Config)


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """{dest: value} of the flags present in `argv` only (defaults left out, nothing required).

    `parser` is modified: pass a fresh one. ``-h`` / ``--help`` is answered by the parser as given,
    so the help shows the defaults and the required flags.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if "-h" in args or "--help" in args:
        parser.parse_args(args)  # prints the help and exits
    for action in parser._actions:
        if action.dest != "help":
            action.default, action.required = argparse.SUPPRESS, False
    return vars(parser.parse_args(argv))


def run_folder(resume: str | Path) -> tuple[Path, Path]:
    """(the run's --out folder, its checkpoint folder) for `--resume` given either of them."""
    ckpt = find_checkpoint(resume)
    return (ckpt.parent if ckpt.name == "checkpoint" else ckpt), ckpt


def config_for_resume(given: dict[str, Any], config_cls: type[C], resumable: frozenset[str]) -> C:
    """The run's saved config (a `config_cls` dataclass) with the given flags in `resumable` applied.

    Raises:
        ValueError naming every given flag that differs from the saved setting.
        FileNotFoundError when DIR holds no checkpoint.
    """
    resume = given["resume"]
    try:
        out, ckpt = run_folder(resume)
    except FileNotFoundError:
        if not unsaved_attempt(Path(resume)):
            raise
        out = ckpt = Path(resume)  # stopped before its first checkpoint: its settings, to start afresh
    saved = config_cls.from_dict(json.loads((ckpt / CONFIG_FILE).read_text()))
    differing = {k: (v, getattr(saved, k)) for k, v in given.items()
                 if k not in resumable and v != getattr(saved, k)}
    if differing:
        listed = ", ".join(f"--{k.replace('_', '-')} ({a!r} given, {b!r} saved)"
                           for k, (a, b) in sorted(differing.items()))
        raise ValueError(f"--resume {resume}: flags that differ from the run's {ckpt / CONFIG_FILE}: "
                         f"{listed}. Drop them (--resume reads every setting from that file), or "
                         "start a new run with another --out")
    overrides = {k: v for k, v in given.items() if k in resumable}
    return dataclasses.replace(saved, **{"out": str(out), **overrides, "resume": str(resume)})


def resume_from_cli(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None,
                    config_cls: type[C], resumable: frozenset[str]) -> C | None:
    """The config of `train.py --resume DIR [flags]`, or None when `--resume` is not given."""
    given = explicit_flags(build_parser(), argv)
    if not given.get("resume"):
        return None
    try:
        return config_for_resume(given, config_cls, resumable)
    except (ValueError, FileNotFoundError) as err:
        build_parser().error(str(err))
        raise  # unreachable: error() exits


def refuse_foreign_out(out: Path) -> None:
    """An existing, non-empty `--out` must hold a fora run (its train_config.json)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder for --out")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {out} is a non-empty folder that holds no fora run (no {CONFIG_FILE}); "
                         "choose a new or empty folder for --out")
    blocker = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"--out {out} cannot be created: {blocker} is a file, not a folder; choose an "
                         "--out whose parents are folders (or move that file)")


def claim_out(out: Path, stack: contextlib.ExitStack) -> None:
    """Create `out` and lock it for this process until `stack` closes (a second process training
    into the same folder is refused). The kernel drops the lock when the process dies, however."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except PermissionError as err:
        raise PermissionError(f"--out {out} cannot be created ({err.strerror}: {err.filename}); "
                              "choose a folder you can write to") from err
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    path = out / LOCK_FILE
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"--out {out} is in use: another process (pid {holder}) is training into it; "
                         "wait for it to finish, stop it, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()

    def release() -> None:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a waiting process then finds no stale file
        f.close()
        if created:  # a run that stopped before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
    stack.callback(release)


def unsaved_attempt(out: Path) -> bool:
    """Whether `out` holds a run that stopped before writing anything to continue or keep: its
    train_config.json, but neither a checkpoint nor an adapter."""
    if not (out / CONFIG_FILE).is_file() or (out / ADAPTER_WEIGHTS).is_file():
        return False
    recover_dir(out / "checkpoint")
    return not (out / "checkpoint").exists()


def replace_attempt(out: Path, diff: dict) -> None:
    """Empty `out`, which holds an `unsaved_attempt` (of a run with the settings `diff` names other)."""
    what = f"a run with other settings ({_differences(diff)})" if diff else "this run"
    log.warning("--out %s held an attempt of %s that stopped before its first checkpoint; nothing to "
                "continue there, so this run replaces it", out, what)
    for p in out.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def refuse_finished(out: Path, resume: str) -> None:
    """`--resume` of a run that already wrote its adapter has nothing left to train."""
    if (out / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"--resume {resume}: that run is finished (its adapter is in {out}); "
                         "nothing to resume. Start a new run with another --out")


def default_out(cfg: _RunConfig) -> Path:
    """`runs/<model>-<method>[-k<K>]`: where a run goes without `--out`."""
    name = Path(cfg.model.rstrip("/")).name  # preset, hub id "owner/name", folder or file.gguf
    name = name[:-len(".gguf")] if name.endswith(".gguf") else name
    return Path("runs") / (f"{name}-{cfg.method}" + (f"-k{cfg.k}" if cfg.k else ""))


def _differences(diff: dict) -> str:
    return ", ".join(f"{k}: {a!r} here vs {b!r} there" for k, (a, b) in sorted(diff.items()))


def _resume_out(cfg: _RunConfig) -> Path:
    """The folder a `--resume` run writes: `--out`, else the run folder of the checkpoint."""
    if cfg.out:
        return Path(cfg.out)
    given = Path(cfg.resume)
    return given.parent if given.name == "checkpoint" or (given / STATE_FILE).is_file() else given


def out_folder(cfg: _RunConfig) -> Path:
    """The folder the run `cfg` writes: `--out`, for `--resume` the run's folder, else `default_out`."""
    return _resume_out(cfg) if cfg.resume else Path(cfg.out) if cfg.out else default_out(cfg)


def prepare_out(cfg: _RunConfig, *, stack: contextlib.ExitStack | None = None,
                main: bool = True) -> tuple[Path, Checkpoint | None]:
    """Resolve `--out`; refuse to overwrite a run; load the checkpoint for `--resume`.

    With `stack` (on the process that writes, `main`), `--out` is created and locked until the
    stack closes (`claim_out`), and an attempt that saved nothing is replaced (`replace_attempt`).
    """
    out = out_folder(cfg)
    refuse_foreign_out(out)
    if main and stack is not None:
        claim_out(out, stack)
    if cfg.resume:
        try:
            ckpt = load_checkpoint(cfg.resume)
        except FileNotFoundError:
            if not unsaved_attempt(Path(cfg.resume)):
                raise
            log.warning("--resume %s: that run stopped before its first checkpoint; training it afresh",
                        cfg.resume)
            ckpt = None
        if ckpt is not None:
            diff = cfg.trajectory_diff(type(cfg).from_dict(ckpt.config))
            if diff:
                raise ValueError(f"--resume {cfg.resume}: the checkpoint belongs to a run with other settings "
                                 f"({_differences(diff)}); resume with the same flags, or start a new run "
                                 "with another --out")
            refuse_finished(out, cfg.resume)
            return out, ckpt
    if (out / CONFIG_FILE).is_file():
        diff = cfg.trajectory_diff(type(cfg).from_dict(json.loads((out / CONFIG_FILE).read_text())))
        if unsaved_attempt(out):
            if main:
                replace_attempt(out, diff)
            return out, None
        if diff:
            raise ValueError(f"--out {out} already holds a different run ({_differences(diff)}); "
                             "choose another --out or delete that folder")
        if (out / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"--out {out} already holds this run, finished; choose another --out "
                             "(or delete that folder to train it again)")
        raise ValueError(f"--out {out} already holds this run; pass --resume {out} to continue it "
                         "from its last checkpoint, or choose another --out")
    return out, None
