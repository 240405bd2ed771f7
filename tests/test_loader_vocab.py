"""Token ids beyond the model's vocabulary: ``TokenLoader(..., vocab_size=V)`` fails on
the batch that holds one, naming the file, the document and the id, before the model
sees it. llm.c and Megatron shards record no vocabulary, so only the loader can tell."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from ember.cli import main
from ember.data import ShardFormatError, TokenLoader
from test_formats import write_llmc, write_megatron

GPT2_VOCAB = 50257  # llm.c version-1 shards start every document with 50256, GPT-2's last id
BAD_ID = 50300
L, B = 8, 2


def gpt2_docs(n: int) -> list[list[int]]:
    """``n`` documents of 6 to 9 in-vocabulary tokens, each led by the llm.c delimiter."""
    rng = np.random.default_rng(0)
    return [[50256, *rng.integers(0, 50000, 5 + i % 4).tolist()] for i in range(n)]


def put_bad_id(docs: list[list[int]], doc: int, at: int) -> int:
    """Replaces token ``at`` of document ``doc`` by ``BAD_ID``; returns its stream position."""
    docs[doc][at] = BAD_ID
    return sum(len(d) for d in docs[:doc]) + at


def all_batches(loader: TokenLoader) -> list[dict | Exception]:
    """Every batch of one sequential pass, or the exception its ``next()`` raised."""
    out: list[dict | Exception] = []
    it = iter(loader)
    for _ in range(len(loader)):
        try:
            out.append(next(it))
        except ShardFormatError as e:
            out.append(e)
    return out


def test_the_batch_holding_the_id_fails_naming_file_document_and_id(tmp_path):
    docs = gpt2_docs(12)
    pos = put_bad_id(docs, doc=7, at=3)
    assert pos % L != 0  # inside one sample only: sample pos // L
    path = write_llmc(tmp_path / "train_000001.bin", [t for d in docs for t in d])
    loader = TokenLoader(path, L, B, shuffle=False, vocab_size=GPT2_VOCAB)
    got = all_batches(loader)
    bad = pos // L // B
    assert [isinstance(g, Exception) for g in got] == [i == bad for i in range(len(got))]
    msg = str(got[bad])
    for fragment in (os.fspath(path), f"token {BAD_ID}", f"token position {pos}", f"byte {1024 + 2 * pos}", "document 7 ", f"size {GPT2_VOCAB}", "model.vocab_size"):
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert isinstance(got[bad], ValueError)


def test_without_vocab_size_nothing_changes(tmp_path):
    docs = gpt2_docs(12)
    pos = put_bad_id(docs, doc=7, at=3)
    path = write_llmc(tmp_path / "bad.bin", [t for d in docs for t in d])
    unchecked = all_batches(TokenLoader(path, L, B, shuffle=False))
    assert not any(isinstance(b, Exception) for b in unchecked)
    assert BAD_ID in unchecked[pos // L // B]["input_ids"]

    clean = write_llmc(tmp_path / "clean.bin", [t for d in gpt2_docs(12) for t in d])
    for shuffle in (False, True):
        plain = iter(TokenLoader(clean, L, B, shuffle=shuffle, seed=3, position_ids=True))
        checked = iter(TokenLoader(clean, L, B, shuffle=shuffle, seed=3, position_ids=True, vocab_size=GPT2_VOCAB))
        for _ in range(5):
            a, b = next(plain), next(checked)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_id_only_in_labels_is_caught(tmp_path):
    """The stream's last token is the last label of the last sample and in no input_ids."""
    docs = gpt2_docs(12)
    n = sum(len(d) for d in docs)
    docs[-1].extend([1] * ((1 - n) % L))  # so that (n - 1) is a multiple of L
    pos = put_bad_id(docs, doc=11, at=len(docs[-1]) - 1)
    path = write_llmc(tmp_path / "labels.bin", [t for d in docs for t in d])
    loader = TokenLoader(path, L, 1, shuffle=False, vocab_size=GPT2_VOCAB)
    got = all_batches(loader)
    assert len(got) == pos // L
    assert [isinstance(g, Exception) for g in got] == [False] * (len(got) - 1) + [True]
    assert f"token {BAD_ID} at token position {pos}" in str(got[-1]) and "document 11 " in str(got[-1])


def test_shuffled_batches_fail_exactly_where_the_id_is(tmp_path):
    """A Megatron pair with signed tokens: a negative id is as fatal to the embedding as a large one."""
    docs = [list(range(i, i + 5 + i % 3)) for i in range(20)]
    docs[13][2] = -5
    docs[4][0] = 1000
    _, idx = write_megatron(tmp_path / "corpus_text_document", docs, 3)  # int16
    plain = iter(TokenLoader(idx, L, B, shuffle=True, seed=11))
    checked = iter(TokenLoader(idx, L, B, shuffle=True, seed=11, vocab_size=1000))
    failures = 0
    for _ in range(2 * len(docs)):  # several epochs
        expected = next(plain)
        window = np.concatenate([expected["input_ids"], expected["labels"][:, -1:]], axis=1)
        holds_bad = bool(((window < 0) | (window >= 1000)).any())
        if holds_bad:
            with pytest.raises(ShardFormatError, match=r"corpus_text_document\.bin: token (-5|1000) .* in document (13|4) "):
                next(checked)
            failures += 1
        else:
            assert np.array_equal(next(checked)["input_ids"], expected["input_ids"])
    assert failures > 0


def test_a_bad_batch_prefetched_but_never_taken_is_harmless(tmp_path):
    docs = gpt2_docs(12)
    pos = put_bad_id(docs, doc=10, at=2)
    path = write_llmc(tmp_path / "tail.bin", [t for d in docs for t in d])
    loader = TokenLoader(path, L, B, shuffle=False, prefetch=16, vocab_size=GPT2_VOCAB)
    assert pos // L // B == len(loader) - 1  # the last batch, queued with the first
    next(iter(loader))
    loader.reset()  # drops the queued batches, the bad one among them
    next(iter(loader))
    loader.close()


def test_vocab_size_must_be_positive(tmp_path):
    path = write_llmc(tmp_path / "a.bin", [t for d in gpt2_docs(4) for t in d])
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"vocab_size must be positive, got {bad}"):
            TokenLoader(path, L, B, vocab_size=bad)


def test_ember_train_stops_with_the_loader_error(tmp_path, capsys):
    """A Megatron shard records no vocabulary, so ``check_vocabulary`` lets it through; the
    loader stops the run with the shard's name instead of torch's IndexError at step 1."""
    docs = [list(range(i, i + 20)) for i in range(12)]
    docs[5][7] = 300
    write_megatron(tmp_path / "web", docs, 8)  # uint16
    config = {
        "model": {"preset": "tiny", "vocab_size": 259},
        "training": {"batch_size": 2, "max_steps": 20, "warmup_steps": 1},
        "data": {"train": str(tmp_path / "web"), "seq_len": 16},
        "checkpoint": {"every_n_steps": None},
        "logging": {"run_dir": str(tmp_path / "runs"), "run_name": "v", "progress_bar": False},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml"), "--no-sample"]) == 2
    err = capsys.readouterr().err
    assert "ember train: error:" in err and "web.bin: token 300 at token position 107" in err, err
    assert "in document 5 " in err and "vocabulary of size 259" in err and "index out of range" not in err
