"""Chat data: ``{"messages": [{"role", "content"}, ...]}`` records rendered with the checkpoint's own
chat template, loss on the assistant turns only.

The template is the checkpoint's (``chat_template.jinja``, else ``tokenizer_config.json``'s
``chat_template``), rendered with jinja2 (the optional extra ``chat``) the way transformers'
``apply_chat_template`` renders it, so text and token ids equal transformers'. Which tokens are
the assistant's comes from rendering prefixes of the conversation: for assistant turn i, the
conversation up to turn i with the generation prompt ends where the turn's tokens start, and the
conversation through turn i ends where they stop (the template's end-of-turn marker included, so
the model learns to stop). A template whose prefixes are not prefixes of the whole is refused.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from fora.models.loss import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
INSTALL_HINT = "pip install 'fora-lora[chat]' (or pip install 'jinja2>=3.1.6')"


def is_chat(records: Sequence[Any]) -> bool:
    """Whether the records are chat records (the first one holds ``messages``)."""
    return bool(records) and isinstance(records[0], Mapping) and "messages" in records[0]


def validate_chats(records: Sequence[Any], *, source: str = "data",
                   where: Callable[[int], str] | None = None) -> None:
    """Raise ValueError naming the first record that is not a chat with an assistant turn.

    `where(i)` says where record `i` (0-based) is; by default "`source`: record i+1 of n".
    """
    def at(i: int) -> str:
        return where(i) if where is not None else f"{source}: record {i + 1} of {len(records)}"
    for i, rec in enumerate(records):
        messages = rec.get("messages") if isinstance(rec, Mapping) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{at(i)} has no 'messages' list, but the first record does; a file holds "
                             "either chat records ({'messages': [...]}) or instruction records, not both")
        for j, m in enumerate(messages):
            if not (isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"{at(i)}: message {j + 1} is {str(m)[:80]}; each message needs a "
                                 f"'role' in {ROLES} and a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{at(i)} has no assistant turn, so nothing to learn; "
                             "drop it or add the assistant's reply")


class ChatTemplate:
    """A checkpoint's chat template and special tokens, rendered as transformers renders them."""

    def __init__(self, source: str, specials: Mapping[str, str]) -> None:
        self.source, self.specials = source, dict(specials)
        self.compiled = _compile(source)

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate:
        """The template of a checkpoint folder (``chat_template.jinja`` or ``tokenizer_config.json``)."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(source, str) or not source:
            raise ValueError(f"{folder} has no chat template (no chat_template.jinja, no 'chat_template' in "
                             "tokenizer_config.json), so 'messages' records cannot be rendered; use an "
                             "instruct checkpoint, or write the records as {instruction, input, output}")
        spec = {**_read_json(folder / "special_tokens_map.json"), **config}
        specials = {k: text for k in SPECIAL_TOKENS if (text := _token_text(spec.get(k))) is not None}
        return cls(source, specials)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        return self.compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.specials)

    def assistant_spans(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.render(messages[:i], add_generation_prompt=True)
            end = self.render(messages[:i + 1])
            if not (text.startswith(end) and end.startswith(start)):
                raise ValueError(f"the chat template does not render the conversation up to turn {i} as a "
                                 "prefix of the whole (it rewrites earlier turns), so the assistant tokens "
                                 "cannot be told apart; use a template without that, or instruction records")
            spans.append((len(start), len(end)))
        return text, spans


def encode_chat(tokenizer: Any, template: ChatTemplate, record: Mapping[str, Any],
                cutoff_len: int = 256) -> dict[str, list[int]]:
    """Token ids of the rendered conversation (as ``apply_chat_template``: no special tokens added
    beyond the template's), labels on the assistant turns only (-100 elsewhere), cut to ``cutoff_len``.

    ``tokenizer``: a ``tokenizers.Tokenizer`` (``LoadedTokenizer.tokenizer``).
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}; use e.g. 256")
    text, spans = template.assistant_spans(record["messages"])
    enc = tokenizer.encode(text, add_special_tokens=False)
    labels = [tid if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for tid, (start, _) in zip(enc.ids, enc.offsets)]
    return {"input_ids": list(enc.ids)[:cutoff_len], "labels": labels[:cutoff_len]}


def encode_chats(tokenizer: Any, template: ChatTemplate, records: Sequence[Mapping[str, Any]],
                 cutoff_len: int = 256) -> list[dict[str, list[int]]]:
    """``encode_chat`` over records, dropping those whose assistant turns lie beyond ``cutoff_len``."""
    examples = [encode_chat(tokenizer, template, r, cutoff_len) for r in records]
    kept = [ex for ex in examples if any(t != IGNORE_INDEX for t in ex["labels"])]
    if not kept:
        raise ValueError(f"all {len(examples)} chat records were dropped: no assistant token fits in "
                         f"cutoff_len={cutoff_len}; raise --cutoff-len or shorten the conversations")
    return kept


def _compile(source: str) -> Any:
    try:
        return _compile_cached(source)
    except ImportError as err:
        raise ImportError(f"'messages' records are rendered with the checkpoint's chat template, which needs "
                          f"jinja2 >= 3.1.6: {INSTALL_HINT}") from err


@lru_cache(maxsize=8)
def _compile_cached(source: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(x) for x in jinja2.__version__.split(".")[:3] if x.isdigit()) < (3, 1, 6):
        raise ImportError(f"jinja2 {jinja2.__version__} is older than 3.1.6")

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` as plain text (transformers tracks it; fora uses prefixes)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(["name:endgeneration"], drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None
