"""How much of a two-option cloze the model knows as a language model, with no instruction.

For a WinoGrande-layout record (LLM-Adapters' "...the given sentence: {sentence}\\n\\nOption1: {a}
\\n\\nOption2: {b}\\n\\nAnswer format: ...", the built-in cloze task's layout too), each option is put
into the blank and the whole sentence is scored: sum of log p(token) after a start token (BOS, or
EOS where the tokenizer has none). The option whose sentence is more likely wins (ties: Option1).
This is lm-eval-harness' full-sentence scoring; it tells a task the model cannot answer in the
instruction format from one it has no knowledge for.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from fora.evaluation.accuracy import continuation_logprobs
from fora.training.data import TokenizerLike

_LAYOUT = re.compile(r"sentence: (?P<sentence>.*?)\n\nOption1: (?P<o1>.*?)\n\nOption2: (?P<o2>.*?)\n\n"
                     r"Answer format:", re.DOTALL)


def fill_in_options(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(sentence with "_", option 1, option 2) of a WinoGrande-layout record."""
    m = _LAYOUT.search(record["instruction"])
    if m is None or m["sentence"].count("_") != 1:
        raise ValueError("not a two-option fill-in record (want '...sentence: <one _>\\n\\nOption1: a\\n\\n"
                         f"Option2: b\\n\\nAnswer format: ...'): {record['instruction'][:120]!r}")
    return m["sentence"], m["o1"], m["o2"]


def fill_in_accuracy(model: nn.Module, tokenizer: TokenizerLike, records: Sequence[Mapping[str, Any]], *,
                     batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Accuracy of ranking the two filled-in sentences by their log-probability.

    A record's right option is its `answer` when that is one of the two words, else Option1 for
    answer "option1" and Option2 for "option2".
    Returns:
        {"accuracy", "n", "scores": [(log p with option 1, log p with option 2)] in record order}.
    """
    if not records:
        raise ValueError("no records to score")
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    pairs, right = [], []
    for rec in records:
        sentence, o1, o2 = fill_in_options(rec)
        for option in (o1, o2):
            pairs.append(([start], tokenizer.encode(sentence.replace("_", option), bos=False)))
        right.append(0 if rec["answer"] in (o1, "option1") else 1)
    scores = continuation_logprobs(model, pairs, pad_id=getattr(tokenizer, "pad_id", tokenizer.eos_id),
                                   batch_size=batch_size, progress=progress)
    pairs_of_scores = list(zip(scores[0::2], scores[1::2]))
    hits = sum((0 if a >= b else 1) == r for (a, b), r in zip(pairs_of_scores, right))
    return {"accuracy": hits / len(records), "n": len(records), "scores": pairs_of_scores}
