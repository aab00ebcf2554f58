"""`--resume DIR` on the command line, and what an `--out` folder may hold (`prepare_out`).

`--resume DIR` alone continues a run: every setting is read from the checkpoint's
`train_config.json`. Flags given together with it must agree with that file, except the ones that
do not change the trajectory (`RESUMABLE_FIELDS`: --out, --merge, --log-every, ...), which
override it; any other difference is refused with the differing keys named.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fora.formats.peft_io import ADAPTER_WEIGHTS
from fora.training.checkpoint import CONFIG_FILE, Checkpoint, find_checkpoint, load_checkpoint


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


# `fora.training.config.parse_args` calls in here; the config class comes in as an argument so
# that this module does not import config back.
C = TypeVar("C", bound=_Config)


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """{dest: value} of the flags present in `argv` only (defaults left out, nothing required).

    `parser` is modified: pass a fresh one.
    """
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
    out, ckpt = run_folder(resume)
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
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"--out {out} is a non-empty folder that holds no fora run (no {CONFIG_FILE}); "
                         "choose a new or empty folder for --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; choose a folder for --out")


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


def prepare_out(cfg: _RunConfig) -> tuple[Path, Checkpoint | None]:
    """Resolve `--out`; refuse to overwrite a run; load the checkpoint for `--resume`."""
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        diff = cfg.trajectory_diff(type(cfg).from_dict(ckpt.config))
        if diff:
            raise ValueError(f"--resume {cfg.resume}: the checkpoint belongs to a run with other settings "
                             f"({_differences(diff)}); resume with the same flags, or start a new run "
                             "with another --out")
        out = Path(cfg.out) if cfg.out else ckpt.path.parent
        refuse_finished(out, cfg.resume)
        return out, ckpt
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    refuse_foreign_out(out)
    if (out / CONFIG_FILE).is_file():
        diff = cfg.trajectory_diff(type(cfg).from_dict(json.loads((out / CONFIG_FILE).read_text())))
        if diff:
            raise ValueError(f"--out {out} already holds a different run ({_differences(diff)}); "
                             "choose another --out or delete that folder")
        if (out / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"--out {out} already holds this run, finished; choose another --out "
                             "(or delete that folder to train it again)")
        if (out / "checkpoint").is_dir():
            raise ValueError(f"--out {out} already holds this run; pass --resume {out} to continue it "
                             "from its last checkpoint, or choose another --out")
        raise ValueError(f"--out {out} already holds an attempt of this run that saved no checkpoint "
                         "(nothing to resume); delete that folder or choose another --out")
    return out, None
