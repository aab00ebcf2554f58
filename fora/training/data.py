"""Instruction data: load Alpaca / LLM-Adapters records, build prompts, tokenize with loss masks.

A record is a dict in the format of LLM-Adapters' Commonsense-170K (`commonsense_170k.json`):
`{"instruction": str, "input": str (may be empty or absent), "output": str, "answer": str (optional)}`,
or a chat record `{"messages": [{"role", "content"}, ...]}` (`fora.training.chat`: the checkpoint's
chat template, loss on assistant turns). Batching lives in `fora.training.batching`.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from fora.formats.atomic import atomic_write_text
from fora.models.loss import IGNORE_INDEX
from fora.training.chat import ChatTemplate, encode_chats, is_chat, validate_chats

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("instruction", "output")

# Alpaca template (tloen/alpaca-lora), the form LLM-Adapters' finetune.py `generate_prompt` intends:
# the response follows "### Response:\n" directly.
_ALPACA = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
)
# LLM-Adapters' finetune.py verbatim, including the 16-space indentation and trailing spaces its
# triple-quoted f-string carries ("sorry about the formatting disaster"); the same strings are in
# NVlabs/DoRA's commonsense_reasoning/finetune.py. Use it to reproduce their runs token for token.
_PAD16 = " " * 16
_LLM_ADAPTERS = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n"
    f"{_PAD16}### Instruction:\n{_PAD16}{{instruction}}\n{_PAD16}\n"
    f"{_PAD16}### Input:\n{_PAD16}{{input}}\n{_PAD16}\n"
    f"{_PAD16}### Response:\n{_PAD16}",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.  \n\n"
    f"{_PAD16}### Instruction:\n{_PAD16}{{instruction}}\n{_PAD16}\n"
    f"{_PAD16}### Response:\n{_PAD16}",
)
# LLM-Adapters' commonsense_evaluate.py `generate_prompt`: the same text with different whitespace
# (no padded blank lines; one trailing space after "request." in the no-input form, none with input).
_LLM_ADAPTERS_EVAL = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    f"{_PAD16}### Instruction:\n{_PAD16}{{instruction}}\n\n"
    f"{_PAD16}### Input:\n{_PAD16}{{input}}\n\n"
    f"{_PAD16}### Response:\n{_PAD16}",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    f"{_PAD16}### Instruction:\n{_PAD16}{{instruction}}\n\n"
    f"{_PAD16}### Response:\n{_PAD16}",
)
TEMPLATES: dict[str, tuple[str, str]] = {"alpaca": _ALPACA, "llm-adapters": _LLM_ADAPTERS,
                                         "llm-adapters-eval": _LLM_ADAPTERS_EVAL}

# `owner/name` or `owner/name:path/in/repo.json` (hub dataset repo ids)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::(?P<file>.+))?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".ndjson")
_JSON_GAP = re.compile(r"[\s,]*")  # between two elements of a JSON list


class TokenizerLike(Protocol):
    """What `encode_record` needs from `fora.formats.tokenizer.LoadedTokenizer`."""

    bos_id: int | None
    eos_id: int

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]: ...


# ---------------------------------------------------------------------------------- loading


def load_records(source: str | os.PathLike[str], *, limit: int | None = None) -> list[dict[str, Any]]:
    """Read instruction records from a local JSON/JSONL file or a hub dataset repo.

    Args:
        source: a `.json` file holding a list of records, a JSONL file (one object per line;
            `.jsonl`/`.ndjson`, or a `.json` file whose content is JSONL), or a hub dataset repo id
            `owner/name` (its single JSON/JSONL file) or `owner/name:file.json`.
        limit: keep only the first `limit` records (after validation).
    Returns:
        The records as loaded; every one has string `instruction` and `output`.
    """
    path = Path(source).expanduser()
    if not path.exists():
        match = _REPO_ID.match(str(source))
        looks_local = str(source).endswith(_DATA_SUFFIXES) and match and not match.group("file")
        if match is None or looks_local:
            raise FileNotFoundError(
                f"data file {str(source)!r} does not exist; pass an existing .json/.jsonl file "
                "or a hub dataset repo id such as 'owner/name' or 'owner/name:file.json'")
        path = _download_from_hub(str(source).split(":", 1)[0], match.group("file"))
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the .json/.jsonl file inside it")
    records = _parse_file(path)
    validate_records(records, source=str(path), where=lambda i: record_location(path, i, len(records)))
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{path} contains no records; pass a file with at least one record"
                         + (" or a larger limit" if limit is not None else ""))
    log.info("loaded %d records from %s", len(records), path)
    return records


def _parse_file(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".ndjson"):
        return _parse_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # HF datasets often ship JSONL under a .json name: one object per line -> "Extra data"
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, path)
        if not text.strip():
            return []
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: "
                         f"{err.msg}; fix the file (a JSON list of records, or JSONL)") from err
    if isinstance(data, dict) and (all(k in data for k in REQUIRED_KEYS) or "messages" in data):
        return [data]  # a one-line JSONL file
    if not isinstance(data, list):
        what = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: top level is {what}, expected a list of records; pass a JSON "
                         "list of {instruction, input, output} objects or a JSONL file")
    return data


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: malformed JSON at line {lineno}, column {err.colno}: "
                             f"{err.msg}; fix that line (JSONL holds one object per line)") from err
    return records


def _download_from_hub(repo_id: str, filename: str | None) -> Path:
    """Fetch a dataset file with huggingface_hub (cached); errors say what to do offline."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        if filename is None:
            files = [f for f in HfApi().list_repo_files(repo_id, repo_type="dataset")
                     if f.endswith(_DATA_SUFFIXES)]
            if len(files) != 1:
                raise ValueError(
                    f"hub dataset {repo_id!r} holds {len(files)} JSON/JSONL files {files[:10]}; "
                    f"name one as '{repo_id}:<file>'")
            filename = files[0]
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except LocalEntryNotFoundError as err:
        raise ConnectionError(_unreachable(repo_id, err)) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"hub dataset repo {repo_id!r} not found (or gated); check the id, "
                                "log in with `hf auth login`, or pass a local file") from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"file {filename!r} not found in hub dataset {repo_id!r}; check the "
                                "name after ':' or pass a local file") from err
    except ValueError:
        raise
    except Exception as err:  # connection errors come from httpx/requests, whichever hub uses
        raise ConnectionError(_unreachable(repo_id, err)) from err


def _unreachable(repo_id: str, err: Exception) -> str:
    return (f"could not fetch hub dataset {repo_id!r}: the Hugging Face Hub is unreachable and the "
            f"file is not cached ({type(err).__name__}); pass a local .json/.jsonl file instead")


def validate_records(records: Sequence[Any], *, source: str = "data",
                     where: Callable[[int], str] | None = None) -> None:
    """Raise ValueError naming the first record that is not an instruction record (chat records: all chats).

    `where(i)` says where record `i` (0-based) is, e.g. `record_location`'s "file, line 8: record
    8 of 40"; by default "`source`: record i+1 of n".
    """
    def at(i: int) -> str:
        return where(i) if where is not None else f"{source}: record {i + 1} of {len(records)}"
    if is_chat(records):
        return validate_chats(records, source=source, where=where)
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"{at(i)} is a {type(rec).__name__}, not an object; "
                             "every record must be {instruction, input, output[, answer]}")
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise ValueError(f"{at(i)} lacks {missing} (it has keys {sorted(rec)}); "
                             "every record needs 'instruction' and 'output'")
        for key in ("instruction", "input", "output"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                raise ValueError(f"{at(i)}: field {key!r} is a "
                                 f"{type(rec[key]).__name__}, expected a string; fix the record")


def record_location(path: str | os.PathLike[str], index: int, count: int) -> str:
    """"PATH, line L: record index+1 of count": where record `index` (0-based) of a file that
    `load_records` read begins (re-read here: only errors need it)."""
    line = _record_line(Path(path).read_text(encoding="utf-8"), index)
    return f"{path}{f', line {line}' if line is not None else ''}: record {index + 1} of {count}"


def _record_line(text: str, index: int) -> int | None:
    """The 1-based line on which record `index` starts: element `index` of a JSON list, else the
    `index`-th non-blank line (JSONL, or a one-object file)."""
    if not text.lstrip().startswith("["):
        nonblank = (n for n, line in enumerate(text.splitlines(), start=1) if line.strip())
        return next(itertools.islice(nonblank, index, None), None)
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    for k in range(index + 1):
        pos = _JSON_GAP.match(text, pos).end()
        if k == index:
            return text.count("\n", 0, pos) + 1
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
    return None


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write records as JSONL atomically (`fora.formats.atomic.atomic_write_text`: temp file, fsync, rename)."""
    return atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


# ---------------------------------------------------------------------------------- prompts


def build_prompt(record: Mapping[str, Any], with_response: bool = False, *,
                 template: str = "alpaca") -> str:
    """The Alpaca prompt of a record; with `with_response=True`, prompt + `output`.

    `template="alpaca"` is the clean Alpaca form; `"llm-adapters"` reproduces LLM-Adapters'
    finetune.py string verbatim (indentation included). A record with an empty or missing
    `input` uses the no-input variant, as `if data_point["input"]` does there.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    with_input, no_input = TEMPLATES[template]
    if record.get("input"):
        prompt = with_input.format(instruction=record["instruction"], input=record["input"])
    else:
        prompt = no_input.format(instruction=record["instruction"])
    return prompt + record["output"] if with_response else prompt


def encode_record(tok: TokenizerLike, record: Mapping[str, Any], cutoff_len: int = 256, *,
                  train_on_inputs: bool = False, template: str = "alpaca") -> dict[str, list[int]]:
    """Tokenize one record as `[BOS] + prompt + response + [EOS]`, cut to `cutoff_len` tokens.

    `labels` equal `input_ids` on the response tokens and EOS and `IGNORE_INDEX` (-100) on BOS and
    the prompt (with `train_on_inputs=True`, only BOS is ignored). BOS is added iff `tok.bos_id`
    is not None. The loss is taken on labels shifted by one inside the model.

    The prompt and the response are encoded separately and concatenated, so the boundary is exact
    by construction and the training prefix equals what a generator is fed at inference (the
    prompt encoded alone). Tokenizing the joined text instead could merge tokens across the
    boundary (e.g. the trailing spaces of the "llm-adapters" template with " the"); with the
    "alpaca" template, whose prompt ends in a newline, byte-level BPE gives the same ids both ways.

    Truncation keeps the start, as LLM-Adapters does; EOS is cut with the tail. A record whose
    response is cut off entirely has no supervised token (`encode_records` drops it).
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}; use e.g. 256")
    prompt_ids = tok.encode(build_prompt(record, template=template), bos=False, eos=False)
    response_ids = tok.encode(record["output"], bos=False, eos=False) + [tok.eos_id]
    bos = [] if tok.bos_id is None else [tok.bos_id]
    input_ids = (bos + prompt_ids + response_ids)[:cutoff_len]
    n_masked = len(bos) if train_on_inputs else len(bos) + len(prompt_ids)
    labels = [IGNORE_INDEX] * min(n_masked, len(input_ids)) + input_ids[n_masked:]
    return {"input_ids": input_ids, "labels": labels}


def encode_records(tok: TokenizerLike, records: Sequence[Mapping[str, Any]], cutoff_len: int = 256,
                   *, train_on_inputs: bool = False, template: str = "alpaca"
                   ) -> list[dict[str, list[int]]]:
    """`encode_record` over records, dropping (and counting in the log) those left unsupervised."""
    examples = [encode_record(tok, r, cutoff_len, train_on_inputs=train_on_inputs,
                              template=template) for r in records]
    kept = [ex for ex in examples if any(t != IGNORE_INDEX for t in ex["labels"])]
    if len(kept) < len(examples):
        log.warning("dropped %d of %d records whose response lies beyond cutoff_len=%d",
                    len(examples) - len(kept), len(examples), cutoff_len)
    if not kept:
        raise ValueError(f"all {len(examples)} records were dropped: no response token fits in "
                         f"cutoff_len={cutoff_len}; raise cutoff_len or shorten the prompts")
    return kept


def record_encoder(tok: TokenizerLike, records: Sequence[Mapping[str, Any]], *, cutoff_len: int = 256,
                   template: str = "alpaca", folder: str | os.PathLike[str] | None = None
                   ) -> Callable[[Sequence[Mapping[str, Any]]], list[dict[str, list[int]]]]:
    """How to tokenize `records`: `encode_records` with `template`, or for chat records
    `encode_chats` with the chat template of the checkpoint `folder` (which `tok` was loaded from)."""
    if not is_chat(records):
        return partial(encode_records, tok, cutoff_len=cutoff_len, template=template)
    if folder is None:
        raise ValueError("chat records need the checkpoint folder for its chat template; pass folder=")
    return partial(encode_chats, tok.tokenizer, ChatTemplate.from_folder(folder), cutoff_len=cutoff_len)


# ---------------------------------------------------------------------------------- splitting


def split_records(records: Sequence[Any], val_fraction: float = 0.05, *,
                  val_size: int | None = None, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Deterministic disjoint train/validation split (both keep the input order).

    `val_size` (a count, as LLM-Adapters' `val_set_size`) overrides `val_fraction`; a positive
    fraction gives at least one validation record.
    """
    n = len(records)
    if val_size is None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; e.g. 0.05")
        val_size = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size} leaves no training records out of {n}; "
                         "use a smaller val_size/val_fraction or more data")
    val_idx = set(random.Random(seed).sample(range(n), val_size))
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
