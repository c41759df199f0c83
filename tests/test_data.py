"""The offline corpus: Python's documentation as byte tokens in Megatron's indexed format,
read back by Megatron's IndexedDataset and sampled by Megatron's GPTDataset."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_locmoe.sim import data


def test_corpus_round_trips_through_megatron(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    prefix = tmp_path / "pydoc"
    stats = data.build_indexed_dataset(prefix, max_stdlib_files=20)
    docs = data.documents(max_stdlib_files=20)
    assert stats["documents"] == len(docs) > 79  # all help topics plus docstrings
    assert stats["tokens"] > 400_000

    ds = IndexedDataset(str(prefix))
    assert len(ds) == len(docs)
    for i in (0, 40, len(docs) - 1):
        ids = ds[i]
        assert ids[-1] == data.EOD
        assert bytes(ids[:-1].astype(np.uint8)).decode("utf-8") == docs[i]

    counts = np.load(f"{prefix}_counts.npy")
    assert counts.sum() == stats["tokens"] and counts[data.EOD] == len(docs)
    assert counts[ord("e")] > counts[ord("z")]  # English text

    tokenizer = NullTokenizer(vocab_size=data.VOCAB_SIZE)
    assert tokenizer.eod == data.EOD  # --vocab-size 257 gives the corpus's end-of-document id
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=128,
        blend=([str(prefix)], None),
        split="98,2,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [64, 8, 0], lambda: True, config
    ).build()
    sample = train[0]
    assert sample["tokens"].shape == (128,) and sample["labels"].shape == (128,)
    assert int(sample["tokens"].max()) < data.VOCAB_SIZE
    assert np.array_equal(sample["tokens"][1:].numpy(), sample["labels"][:-1].numpy())


def test_domain_shards_are_per_node_datasets(tmp_path):
    """One indexed dataset per node domain (help topics, then slices of the docstrings in
    file order), disjoint and together the whole corpus; counts of all domains for hash."""
    built = data.build_domain_datasets(tmp_path, num_domains=3, max_stdlib_files=30)
    names = [d["name"] for d in built["domains"]]
    assert names[0] == "topics" and all(n.startswith("docstrings:") for n in names[1:])
    assert len(built["prefixes"]) == 3
    whole = data.documents(max_stdlib_files=30)
    assert sum(d["documents"] for d in built["domains"]) == len(whole)
    counts = np.load(built["counts"])
    assert counts.sum() == built["tokens"] == sum(d["tokens"] for d in built["domains"])
    assert not any("site-packages" in str(p) for p in data.stdlib_files())
    with pytest.raises(ValueError, match="at least 2"):
        data.domain_shards(1)


def test_held_out_split_and_control_mixture(tmp_path):
    """Every K-th document of the corpus order is held out, whatever the number of domains;
    the control's mixture holds every domain's training (held-out) documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    whole = data.documents(max_stdlib_files=30)
    built = {
        n: data.build_domain_datasets(tmp_path / f"n{n}", n, 30, held_out_every=5) for n in (2, 3)
    }
    for b in built.values():
        train = sum(len(IndexedDataset(p)) for p in b["prefixes"])
        valid = sum(len(IndexedDataset(p)) for p in b["valid_prefixes"])
        assert valid == len(whole) // 5 and train + valid == len(whole)
        assert len(IndexedDataset(b["mixture"])) == train
        assert len(IndexedDataset(b["mixture_valid"])) == valid
        held = IndexedDataset(b["mixture_valid"])
        text = bytes(held[0][:-1].astype(np.uint8)).decode("utf-8")
        assert text == whole[4]  # the 5th document of the corpus
    # the same held-out documents for 2 and 3 domains
    a, c = (IndexedDataset(built[n]["mixture_valid"]) for n in (2, 3))
    assert all(np.array_equal(a[i], c[i]) for i in range(len(a)))
    with pytest.raises(ValueError, match="held_out_every"):
        data.build_domain_datasets(tmp_path / "bad", 2, 30, held_out_every=1)


def test_damaged_datasets_are_refused_before_training(tmp_path):
    """What Megatron's loader would fail on deep inside (or read past the end of) is refused
    up front, naming the file; a sound dataset gives its document count."""
    prefix = tmp_path / "c"
    stats = data.write_documents(prefix, ["alpha beta", "gamma", "delta epsilon zeta"])
    assert data.check_indexed_dataset(prefix) == stats["documents"] == 3
    whole = (tmp_path / "c.bin").read_bytes()

    (tmp_path / "c.bin").write_bytes(whole[:-5])  # an incomplete copy
    with pytest.raises(data.CorpusError, match=r"c.bin holds \d+ bytes, its index c.idx describes"):
        data.check_indexed_dataset(prefix)
    (tmp_path / "c.bin").write_bytes(whole)
    idx = (tmp_path / "c.idx").read_bytes()
    (tmp_path / "c.idx").write_bytes(b"not an index" + idx[12:])
    with pytest.raises(data.CorpusError, match="is not a Megatron dataset index"):
        data.check_indexed_dataset(prefix)
    (tmp_path / "c.idx").write_bytes(idx[:40])
    with pytest.raises(data.CorpusError, match="c.idx is truncated"):
        data.check_indexed_dataset(prefix)
    with pytest.raises(data.CorpusError, match="nowhere.idx: no such file"):
        data.check_indexed_dataset(tmp_path / "nowhere")
