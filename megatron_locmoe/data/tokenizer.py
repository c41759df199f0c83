"""The corpus's tokenizer: a byte-level BPE (Hugging Face ``tokenizers``) trained offline.

Byte-level, so every text has an encoding (no unknown token) and a Chinese character, a Cyrillic
word and a C operator all cost what their frequency says (GPT-2's vocabulary, trained on English
web text, spends three to four tokens per classical Chinese character; this one about one).

The vocabulary's layout is chosen for Megatron's ``NullTokenizer``: the GPU machine has no
``transformers``, and a run there reads the token files with ``--tokenizer-type NullTokenizer
--vocab-size V``, whose end-of-document id is ``V - 1`` (``megatron/core/tokenizers/text/
libraries/null_tokenizer.py``). So the BPE learns ``V - 1`` tokens (the 256 byte symbols and
``V - 257`` merges) and ``<|endoftext|>`` is appended last, as id ``V - 1``: the same vocabulary
size and end-of-document id either way (:func:`megatron_flags` gives both sets of flags;
``tests/test_corpus.py`` loads both through Megatron's ``build_tokenizer``).

Saved with ``transformers.PreTrainedTokenizerFast.save_pretrained``, which Megatron's
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`` loads without the hub.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

EOD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 32768
"""2^15 ids: 32,767 learned, ``<|endoftext|>`` = 32767; a multiple of 128, so Megatron pads nothing."""
MODEL_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    pass


def train(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE of exactly ``vocab_size`` ids learned from ``texts``; ``<|endoftext|>``
    is the last id. Deterministic for the same texts in the same order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 258 <= vocab_size <= 65536:
        raise TokenizerError(
            f"vocab_size={vocab_size}: needs the 256 byte symbols and <|endoftext|>, and ids "
            "that fit the uint16 token files (at most 65536)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    learned = tokenizer.get_vocab_size()
    if learned != vocab_size - 1:
        raise TokenizerError(
            f"the training sample supports only {learned} tokens, {vocab_size - 1} wanted: give it "
            "more text (--tokenizer-sample-bytes) or ask for a smaller --vocab-size"
        )
    tokenizer.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    assert tokenizer.token_to_id(EOD_TOKEN) == vocab_size - 1
    return tokenizer


def save(tokenizer, directory: str | Path) -> str:
    """Save for Megatron's HuggingFaceTokenizer (``tokenizer.json`` + ``tokenizer_config.json``);
    returns the sha256 of ``tokenizer.json`` (the model: vocabulary, merges, pre-tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOD_TOKEN, bos_token=EOD_TOKEN
    ).save_pretrained(str(directory))
    return checksum(directory)


def checksum(directory: str | Path) -> str:
    """sha256 of the saved model file, ``DIR/tokenizer.json``."""
    return hashlib.sha256((Path(directory) / MODEL_FILE).read_bytes()).hexdigest()


def load(directory: str | Path):
    """The ``tokenizers.Tokenizer`` saved in ``directory``."""
    from tokenizers import Tokenizer

    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise TokenizerError(f"{path}: no tokenizer saved there")
    return Tokenizer.from_file(str(path))


def vocab_size(tokenizer) -> int:
    """Ids in use, ``<|endoftext|>`` (the last) included."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def encode(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's token ids (uint16) with ``<|endoftext|>`` appended: one document each.
    The batch is encoded on every core (the library's own threads)."""
    eod = tokenizer.token_to_id(EOD_TOKEN)
    batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
    encodings = batch(texts, add_special_tokens=False)
    out = []
    for enc in encodings:
        ids = np.empty(len(enc.ids) + 1, dtype=np.uint16)
        ids[:-1] = enc.ids
        ids[-1] = eod
        out.append(ids)
    return out


def megatron_flags(directory: str | Path, size: int) -> dict[str, list[str]]:
    """Megatron's tokenizer flags for the corpus, two equivalent ways: the saved tokenizer
    (needs ``transformers``) or the NullTokenizer (needs nothing; same vocabulary size and
    end-of-document id, no decoding)."""
    return {
        "huggingface": [
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(directory),
        ],
        "null": ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(size)],
    }


def megatron_tokenizer(flags: list[str]):
    """Megatron's tokenizer for ``flags``, parsed by Megatron's own argument parser and built by
    the ``build_tokenizer`` that ``megatron.training`` uses (set ``HF_HUB_OFFLINE=1`` to prove
    the Hugging Face directory loads without the hub)."""
    import argparse

    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import add_megatron_arguments

    args = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(flags)
    args.rank = 0
    return build_tokenizer(args)
