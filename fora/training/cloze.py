"""A WinoGrande-style two-option cloze built from real English: CPython's own documentation.

`pydoc_data.topics` ships with every Python (the text of `help("if")` etc.), so the task needs no
download. Prose sentences are cut from its paragraphs (code blocks, grammar rules and headings
skipped); in each sentence one content word is blanked and offered against a distractor: a word
of the same coarse kind (same inflection suffix: -ed, -ing, -ly, -s, or none) drawn from an
occurrence in *another* paragraph of the same split, so both options have corpus frequencies and the
right morphology but usually only one fits the sentence. The record is LLM-Adapters' WinoGrande
layout with the two words as the answer choices (style="word", the default):

    Please choose the correct answer to fill in the blank to complete the given sentence: The _
    statement is used for conditional execution.\\n\\nOption1: while\\n\\nOption2: if\\n\\n
    Answer format: while/if   ->   output "the correct answer is if"

style="option" keeps WinoGrande's labels (``Answer format: option1/option2`` -> "the correct
answer is option2"). Words are the default because the labelled format stayed at chance in
training while the word format did not (the runs are in docs/reproduction.md).

Splits are by paragraph (a hash of its text puts about one in five into test), so no sentence
or paragraph of the test split occurs in training; `prose_paragraphs("test")` is held-out English for perplexity.
The text is CPython's, so the task is fixed for a given Python minor version (`corpus_sha256`
fingerprints it).
"""
from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence

SPLITS = ("train", "test")
STYLES = ("word", "option")
INSTRUCTION = ("Please choose the correct answer to fill in the blank to complete the given sentence: "
               "{sentence}\n\nOption1: {option1}\n\nOption2: {option2}\n\nAnswer format: {choices}")
_TEST_EVERY = 5  # about one paragraph in five is held out
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[a-z]{4,14}")
_SUFFIXES = ("ing", "ed", "ly", "s")
# Function words long enough to pass the length filter: blanking them tests grammar, not meaning.
_STOPWORDS = frozenset("""
about above after again against also although among another anything because been before being
below between both cannot could does doing done down during each either else even ever every from
further given have having here however into itself just least less many more most much must neither
never next none once only onto other others otherwise over same shall should since some such than
that their theirs them then there therefore these they this those though through thus together
too under unless until upon very were what whatever when whenever where whether which while whom
whose will with within without would your yours also always often usually rather instead perhaps
""".split())


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics  # stdlib; imported late so that importing fora stays cheap

    return topics


def corpus_sha256() -> str:
    """Fingerprint of the `pydoc_data.topics` text this Python ships (the task depends on it)."""
    text = "\0".join(f"{k}\0{v}" for k, v in sorted(_topics().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def _paragraph_split(paragraph: str) -> str:
    digest = hashlib.sha256(paragraph.encode()).digest()
    return "test" if digest[0] % _TEST_EVERY == 0 else "train"


def _is_prose(block: str) -> bool:
    lines = block.split("\n")
    if any(line.startswith(" ") for line in lines):  # code, grammar and indented examples
        return False
    if any(set(line) <= set("*=-~^") for line in lines):  # a heading underline
        return False
    return "::=" not in block and len(block) > 80


def prose_paragraphs(split: str) -> list[str]:
    """The distinct prose paragraphs (one line each) of `split`, in topic order.

    A paragraph's split is fixed by its text's SHA-256 (about one in five is test), so the
    two splits are disjoint and stable when topics are added or reordered.
    """
    _check_split(split)
    out, seen = [], set()
    for name in sorted(_topics()):
        for block in re.split(r"\n\s*\n", _topics()[name]):
            text = " ".join(block.split())
            if _is_prose(block.strip("\n")) and text not in seen and _paragraph_split(text) == split:
                seen.add(text)
                out.append(text)
    return out


def _raw_sentences(split: str) -> list[tuple[int, str]]:
    out, seen = [], set()
    for p, paragraph in enumerate(prose_paragraphs(split)):
        for sent in _SENTENCE_END.split(paragraph):
            if (sent.endswith(".") and 8 <= len(sent.split()) <= 40 and sent[0].isupper() and "_" not in sent
                    and sent not in seen):
                seen.add(sent)
                out.append((p, sent))
    return out


def sentences(split: str) -> list[tuple[int, str]]:
    """(paragraph index, sentence) pairs: distinct prose sentences of 8-40 words ending in a full
    stop (none holding "_", the blank marker). A sentence that also occurs in a test paragraph
    (the docs repeat some) belongs to test only."""
    pairs = _raw_sentences(split)
    if split == "train":
        held_out = {s for _, s in _raw_sentences("test")}
        pairs = [(p, s) for p, s in pairs if s not in held_out]
    return pairs


def _kind(word: str) -> str:
    return next((s for s in _SUFFIXES if word.endswith(s)), "")


def _blankable(tokens: Sequence[str]) -> list[int]:
    """Positions of plain lower-case content words (not quoted code, not function words)."""
    keep = []
    for i, tok in enumerate(tokens):
        word = tok.rstrip(",;:.")
        if _WORD.fullmatch(word) and word not in _STOPWORDS and tokens.count(tok) == 1:
            keep.append(i)
    return keep


def _occurrences(pairs: Sequence[tuple[int, str]]) -> dict[str, list[tuple[int, str]]]:
    """kind -> every (paragraph, word) occurrence of a blankable word: frequency-weighted draws."""
    pool: dict[str, list[tuple[int, str]]] = {}
    for para, sent in pairs:
        tokens = sent.split()
        for i in _blankable(tokens):
            word = tokens[i].rstrip(",;:.")
            pool.setdefault(_kind(word), []).append((para, word))
    return pool


def cloze_task(split: str, n: int | None = None, seed: int = 0, *, style: str = "word",
               blanks: int = 1) -> list[dict[str, str]]:
    """Two-option cloze records of `split` in LLM-Adapters' format, deterministic in `seed`.

    Args:
        split: "train" or "test" (disjoint paragraphs).
        n: keep the first `n` records (after the seeded shuffle); None keeps all (654 train,
            185 test on CPython 3.11 with one blank per sentence).
        seed: chooses the blanked words, the distractors and the option order.
        style: "word" (default): the choices are the two words, ``Answer format: if/while`` and
            output "the correct answer is if"; "option": WinoGrande's labels exactly,
            ``Answer format: option1/option2`` and "the correct answer is option2".
        blanks: up to this many records per sentence, each blanking a different word (more
            training data from the same text; the test split is meant for 1).
    Returns:
        Records `{"instruction", "input": "", "output": "the correct answer is <answer>", "answer"}`;
        the right word is Option1 in exactly half (rounded down) of them.
    """
    _check_split(split)
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 (or None for every sentence), got {n}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if not (isinstance(blanks, int) and blanks >= 1):
        raise ValueError(f"blanks must be an int >= 1 (records per sentence), got {blanks!r}")
    rng = random.Random(f"cloze-{split}-{seed}")
    pairs = sentences(split)
    pool = _occurrences(pairs)
    drafts = []
    for para, sent in pairs:
        tokens = sent.split()
        slots = _blankable(tokens)
        if not slots:
            continue
        lowered = set(re.findall(r"[a-z]+", sent.lower()))
        # rng.choice for one blank draws as the task always did, so existing seeds keep their records
        picks = [rng.choice(slots)] if blanks == 1 else rng.sample(slots, min(blanks, len(slots)))
        for i in picks:
            word = tokens[i].rstrip(",;:.")
            candidates = [w for t, w in pool[_kind(word)] if t != para and w not in lowered]
            if not candidates:
                continue
            distractor = rng.choice(candidates)
            blanked = " ".join(tokens[:i] + [tokens[i].replace(word, "_", 1)] + tokens[i + 1:])
            drafts.append((blanked, word, distractor))
    rng.shuffle(drafts)
    if n is not None and n > len(drafts):
        raise ValueError(f"the {split} split has only {len(drafts)} cloze records, asked for n={n}; "
                         "lower n or pass None for all of them")
    drafts = drafts[:n] if n is not None else drafts
    return _records(drafts, style, rng)


def _records(drafts: Sequence[tuple], style: str, rng: random.Random) -> list[dict]:
    """Records from (blanked, word, distractor[, cluster]) drafts: options alternate, then shuffle."""
    records = []
    for j, (blanked, word, distractor, *cluster) in enumerate(drafts):
        first = j % 2 == 0  # alternate, then shuffle: balanced answers, no order pattern
        option1, option2 = (word, distractor) if first else (distractor, word)
        answer = word if style == "word" else ("option1" if first else "option2")
        choices = f"{option1}/{option2}" if style == "word" else "option1/option2"
        records.append({"instruction": INSTRUCTION.format(sentence=blanked, option1=option1, option2=option2,
                                                          choices=choices),
                        "input": "", "output": f"the correct answer is {answer}", "answer": answer,
                        **({"cluster": cluster[0]} if cluster else {})})
    rng.shuffle(records)
    return records


def cloze_all_blanks(split: str = "test", seed: int = 0, *, style: str = "word") -> list[dict]:
    """Every eligible blank of every sentence of `split`: the larger test set for paired statistics.

    One record per blankable word (the slots `cloze_task` draws from) whose kind has a distractor
    in another paragraph; the distractor, option order and record order are drawn from `seed`.
    Each record carries `"cluster"`: the index of its source sentence in `sentences(split)`, the
    same for every record of one sentence, so a bootstrap can resample sentences
    (`fora.evaluation.paired`). Records are `cloze_task`'s otherwise (the extra key is ignored by
    training and evaluation). 1,242 test records from 185 sentences on CPython 3.11 (cloze_task: 185).
    """
    _check_split(split)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    rng = random.Random(f"cloze-all-{split}-{seed}")
    pairs = sentences(split)
    pool = _occurrences(pairs)
    drafts = []
    for cluster, (para, sent) in enumerate(pairs):
        tokens = sent.split()
        lowered = set(re.findall(r"[a-z]+", sent.lower()))
        for i in _blankable(tokens):
            word = tokens[i].rstrip(",;:.")
            candidates = [w for t, w in pool[_kind(word)] if t != para and w not in lowered]
            if candidates:
                blanked = " ".join(tokens[:i] + [tokens[i].replace(word, "_", 1)] + tokens[i + 1:])
                drafts.append((blanked, word, rng.choice(candidates), cluster))
    rng.shuffle(drafts)
    return _records(drafts, style, rng)
