"""The pool's tokenizer: a byte-level BPE trained locally at ingest, or loaded from a file.

Saved under `<data>/tokenizer/` in Hugging Face's format (`tokenizer.json` plus
`tokenizer_config.json` and `special_tokens_map.json`), so `AutoTokenizer.from_pretrained` on a
copy of that folder works with no code from this project. `<|endoftext|>` ends every document and
doubles as the padding token.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from schemas.errors import MatesError
from schemas.storage import split_url, store_for

EOS = "<|endoftext|>"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer_file(path: str) -> Tokenizer:
    """Any Hugging Face `tokenizer.json` (a file or a folder holding one, local or URL). One without
    `<|endoftext|>` (Llama 3 ends text with `<|end_of_text|>`) gets it added as a special token:
    the pool ends every document with it and pads with it."""
    if path.rstrip("/").endswith(".json"):
        parent, name = split_url(path.rstrip("/"))
    else:  # a folder holding tokenizer.json
        parent, name = path.rstrip("/"), "tokenizer.json"
    try:
        tok = Tokenizer.from_str(store_for(parent).read_bytes(name).decode("utf-8"))
    except MatesError:
        raise
    except Exception as exc:
        raise MatesError(f"`tokenizer.path` {path!r} is not a tokenizers JSON file: {exc}") from exc
    if tok.token_to_id(EOS) is None:
        tok.add_special_tokens([EOS])
    return tok


def save_tokenizer(tok: Tokenizer, data_url: str) -> None:
    """Write the tokenizer in HF format to `<data>/tokenizer/`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)
    store = store_for(data_url)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        for name in FILES:
            store.put_file(os.path.join(tmp, name), "tokenizer", name)


def load_pool_tokenizer(data_url: str) -> Tokenizer:
    """The tokenizer that ingest saved for the pool at `data_url`."""
    store = store_for(data_url)
    if not store.exists("tokenizer", "tokenizer.json"):
        raise MatesError(f"`data` {data_url!r} has no tokenizer/tokenizer.json; run `mates ingest` first.")
    return Tokenizer.from_str(store.read_bytes("tokenizer", "tokenizer.json").decode("utf-8"))
