"""A tiny word-level tokenizer with a chat template, built offline, and small jsonl sources for the data tests."""

from __future__ import annotations

import json
import os

WORDS = ["<pad>", "<eos>", "<unk>", "<system>", "<user>", "<assistant>", "<end>", "be", "brief", "hi", "hello",
         "how", "are", "you", "fine", "thanks", "bye", "ok", "the", "a", "cat", "sat", "on", "mat"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def make_tokenizer(folder: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def ids(words: str) -> list[int]:
    return [WORDS.index(w) for w in words.split()]
