"""Chat records (`messages`) rendered with the checkpoint's chat template, loss on assistant turns.

Oracles: transformers' `apply_chat_template` on SmolLM2-135M-Instruct's own template (text and
token ids), and its `return_assistant_tokens_mask` on the same template with `{% generation %}`
around the assistant turns (which tokens are the assistant's, found by transformers' own tracker).
"""
from __future__ import annotations

import json
import math
import sys

import pytest

from fora.formats.loading import load_tokenizer
from fora.training.chat import ChatTemplate, encode_chat, encode_chats, validate_chats
from fora.training.data import load_records, record_encoder

SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# the same text, with the assistant turns marked for transformers' return_assistant_tokens_mask
SMOL_TRACKED = SMOL.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}")
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And thanks?"},
     {"role": "assistant", "content": "Merci.\nDe rien."}],
    [{"role": "user", "content": "  spaces  and ünïcode "}, {"role": "assistant", "content": " leading space"}],
]


@pytest.fixture
def chat_folder(tiny, tmp_path):
    """The tiny checkpoint with SmolLM2's template in its tokenizer_config.json (a char-level vocabulary)."""
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SMOL}))
    return folder


def _supervised_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])


@pytest.mark.slow
@pytest.mark.parametrize("messages", CHATS)
def test_text_and_ids_equal_transformers_apply_chat_template(messages):
    import fora
    from transformers import AutoTokenizer

    folder = fora.resolve_checkpoint("smollm2-135m")
    hf = AutoTokenizer.from_pretrained(folder)
    template, tok = ChatTemplate.from_folder(folder), load_tokenizer(folder)
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    for prompt in (False, True):
        assert template.render(messages, add_generation_prompt=prompt) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt)
    example = encode_chat(tok.tokenizer, template, {"messages": messages}, cutoff_len=4096)
    assert example["input_ids"] == hf.apply_chat_template(messages, tokenize=True)["input_ids"]
    turns = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    assert _supervised_text(tok, example) == "".join(turns)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CHATS)
def test_assistant_labels_equal_transformers_assistant_mask(messages):
    import fora
    from transformers import AutoTokenizer

    folder = fora.resolve_checkpoint("smollm2-135m")
    hf = AutoTokenizer.from_pretrained(folder)
    out = hf.apply_chat_template(messages, chat_template=SMOL_TRACKED, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ours = encode_chat(load_tokenizer(folder).tokenizer, ChatTemplate(SMOL_TRACKED, {}), {"messages": messages}, 4096)
    assert ours["input_ids"] == out["input_ids"]
    assert [label != -100 for label in ours["labels"]] == [bool(m) for m in out["assistant_masks"]]


def test_chat_jsonl_trains_on_assistant_turns_only(chat_folder, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    records = load_records(path)
    tok = load_tokenizer(chat_folder)
    examples = record_encoder(tok, records, cutoff_len=4096, folder=chat_folder)(records)
    assert [_supervised_text(tok, ex) for ex in examples] == [
        "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant") for chat in CHATS]
    assert tok.decode(examples[0]["input_ids"]).startswith("<|im_start|>system\nYou are a helpful")
    with pytest.raises(ValueError, match="chat records need the checkpoint folder for its chat template"):
        record_encoder(tok, records)


def test_cutoff_keeps_the_start_and_drops_unsupervised_chats(chat_folder):
    tok, template = load_tokenizer(chat_folder), ChatTemplate.from_folder(chat_folder)
    cut = encode_chat(tok.tokenizer, template, {"messages": CHATS[0]}, cutoff_len=10)
    assert len(cut["input_ids"]) == 10 and set(cut["labels"]) == {-100}
    with pytest.raises(ValueError, match="all 1 chat records were dropped: no assistant token fits in cutoff_len=10"):
        encode_chats(tok.tokenizer, template, [{"messages": CHATS[0]}], cutoff_len=10)
    with pytest.raises(ValueError, match="cutoff_len must be >= 1, got 0"):
        encode_chat(tok.tokenizer, template, {"messages": CHATS[0]}, cutoff_len=0)


def test_train_py_trains_on_chat_records(cfg, chat_folder, tmp_path):
    from dataclasses import replace

    from fora.training.run import main

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 8))
    result = main(replace(cfg, model=str(chat_folder), data=str(path), val_size=2, cutoff_len=512))
    assert result.steps == 2 and all(math.isfinite(loss) for _, loss in result.train_losses)
    assert (result.out / "adapter_model.safetensors").is_file()


def test_a_checkpoint_without_a_template_is_refused(tiny):
    with pytest.raises(ValueError, match="has no chat template .* use an instruct checkpoint, or write the records"):
        ChatTemplate.from_folder(tiny)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # drops every assistant turn but the last: the conversation up to turn 1 is no prefix of the whole
    template = ChatTemplate("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                            "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}assistant: {% endif %}", {})
    with pytest.raises(ValueError, match="does not render the conversation up to turn 2 as a prefix"):
        template.assistant_spans(CHATS[1])


def test_missing_jinja2_names_the_install(monkeypatch):
    from fora.training import chat

    chat._compile_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(ImportError, match=r"needs jinja2 >= 3.1.6: pip install 'fora-lora\[chat\]'"):
        ChatTemplate(SMOL + " ", {})


@pytest.mark.parametrize("records,message", [
    ([{"messages": CHATS[0]}, {"instruction": "x", "output": "y"}],
     r"chat.jsonl: record 2 of 2 has no 'messages' list, but the first record does"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "record 1 of 1: message 1 is .*each message needs a 'role'"),
    ([{"messages": [{"role": "user", "content": 3}]}], "record 1 of 1: message 1 is .*a string 'content'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "record 1 of 1 has no assistant turn"),
])
def test_malformed_chat_records_are_refused(records, message):
    with pytest.raises(ValueError, match=message):
        validate_chats(records, source="chat.jsonl")


def test_load_records_names_the_line_of_a_malformed_chat(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n\n" + json.dumps({"messages": [{"role": "user",
                                                                                          "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 3: record 2 of 2 has no assistant turn"):
        load_records(path)
