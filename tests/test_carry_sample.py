"""``carry pack --sample F``: an evenly spaced fraction of every domain's training documents
travels, held-out sets whole, the mixture rebuilt there from the sampled domains and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_locmoe.data import carry, indexed

VOCAB = 50


def _docs(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB - 1, int(rng.integers(3, 9)), dtype=np.uint16) for _ in range(n)]


def _corpus(root):
    """Two domains with held-out sets, the mixture, the hash counts, a tokenizer, build.json."""
    docs = {}
    for k, name in enumerate(("alpha", "beta")):
        for suffix, n in (("", 10), ("_valid", 4)):
            docs[name + suffix] = _docs(10 * k + len(suffix), n)
            w = indexed.DatasetWriter(root / f"{name}{suffix}", VOCAB)
            w.add(docs[name + suffix])
            w.close()
    for name, suffix in (("mixture", ""), ("mixture_valid", "_valid")):
        indexed.concatenate(root / name, [root / f"alpha{suffix}", root / f"beta{suffix}"], VOCAB)
    np.save(root / "all_counts.npy", np.ones(VOCAB, dtype=np.int64))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    build = {"domains": ["alpha", "beta"], "vocab_size": VOCAB, "eod": VOCAB - 1}
    (root / "build.json").write_text(json.dumps(build))
    return docs


def _read(prefix) -> list[list[int]]:
    lengths = indexed.read_lengths(prefix)
    tokens = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def test_a_sample_travels_and_unpacks_checked(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    docs = _corpus(data)
    index = carry.pack(data, tmp_path / "parts", sample=0.3)
    assert index["sample"] == 0.3
    carry.stage(tmp_path / "parts", tmp_path / "stage")
    result = carry.unpack(tmp_path / "stage", tmp_path / "out")
    out = tmp_path / "out"
    kept = [3, 6, 9]  # floor((i + 1) 0.3) > floor(i 0.3)
    for name in ("alpha", "beta"):
        assert _read(out / name) == [docs[name][i].tolist() for i in kept]
        assert _read(out / f"{name}_valid") == [d.tolist() for d in docs[f"{name}_valid"]]
        counts = np.load(out / f"{name}_counts.npy")
        assert counts.sum() == sum(len(docs[name][i]) for i in kept)
    assert _read(out / "mixture") == _read(out / "alpha") + _read(out / "beta")
    assert result["datasets"]["mixture_valid"]["documents"] == 8
    assert json.loads((out / carry.INDEX).read_text())["sample"] == 0.3
    whole = carry.pack(data, tmp_path / "whole")
    assert whole["sample"] is None and whole["raw_bytes"] > index["raw_bytes"]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_a_fraction_outside_0_1_is_refused(tmp_path, fraction, capsys):
    data = tmp_path / "corpus"
    data.mkdir()
    _corpus(data)
    argv = ["pack", "--data", str(data), "--out", str(tmp_path / "p"), "--sample", str(fraction)]
    assert carry.main(argv) == 1
    assert f"--sample {fraction}: give a fraction in (0, 1)" in capsys.readouterr().err


def test_a_sample_that_keeps_no_document_is_refused(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    _corpus(data)
    with pytest.raises(carry.CarryError, match="keeps none of them"):
        carry.pack(data, tmp_path / "p", sample=0.05)
