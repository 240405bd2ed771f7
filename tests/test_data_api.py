"""The Python data API as a user meets it: writing shards, reading them, loading batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ember.data import ShardFormatError, ShardWriter, TokenLoader, open_dataset


def write(path, docs, vocab=1000):
    with ShardWriter(path, vocab) as w:
        for d in docs:
            w.add_document(d)
    return path


def random_docs(rng, n, max_len=40, vocab=1000):
    return [rng.integers(0, vocab, size=rng.integers(0, max_len)) for _ in range(n)]


def test_writer_round_trip_and_dtype(tmp_path):
    rng = np.random.default_rng()
    docs = random_docs(rng, 57)
    ds = open_dataset(write(tmp_path / "a", docs))
    assert len(ds) == 57 and ds.num_tokens == sum(len(d) for d in docs)
    assert ds.dtype == np.uint16 and ds.format == "ember" and ds.vocab_size == 1000
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    big = open_dataset(write(tmp_path / "b", [[70000, 3]], vocab=128256))
    assert big.dtype == np.uint32
    np.testing.assert_array_equal(big[-1], [70000, 3])


def test_documents_are_zero_copy_read_only_views(tmp_path):
    ds = open_dataset(write(tmp_path / "a", [[1, 2, 3], [4, 5]]))
    a, b = ds[0], ds[1]
    assert not a.flags.owndata and not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 9
    # Both views point into the same mapping of the file.
    assert a.__array_interface__["data"][0] + 3 * 2 == b.__array_interface__["data"][0]


def test_writer_error_inside_with_leaves_no_file(tmp_path):
    path = tmp_path / "shard"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, 100) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("tokenizer crashed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_documents_by_number(tmp_path):
    with ShardWriter(tmp_path / "s", 50) as w:
        w.add_document([1, 2])
        with pytest.raises(ValueError, match="document 1, token 2: id 50"):
            w.add_document([3, 4, 50])
        with pytest.raises(TypeError, match="integers"):
            w.add_document([1.5])
        w.add_document([5])
    np.testing.assert_array_equal(open_dataset(tmp_path / "s")[1], [5])


def test_existing_shard_survives_a_failed_rewrite(tmp_path):
    path = write(tmp_path / "s", [[1, 2, 3]])
    before = path.read_bytes()
    with pytest.raises(KeyError):
        with ShardWriter(path, 100) as w:
            w.add_document([7, 7])
            raise KeyError("interrupted")
    assert path.read_bytes() == before


def test_loader_batches_cover_the_stream(tmp_path):
    rng = np.random.default_rng()
    docs = random_docs(rng, 200)
    stream = np.concatenate(docs)
    write(tmp_path / "a", docs)
    L = 7
    n = (len(stream) - 1) // L
    loader = TokenLoader(tmp_path / "a", seq_len=L, batch_size=4, seed=int(rng.integers(1 << 30)))
    seen = []
    for _, batch in zip(range(n // 4), loader):
        assert batch["input_ids"].shape == (4, L) and batch["input_ids"].dtype == torch.int64
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        for row in batch["input_ids"]:
            start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, L)[::L] == row.numpy(), axis=1))[0]) * L
            seen.append(start // L)
    # One epoch draws each sample at most once.
    assert len(seen) == len(set(seen))


def test_batches_are_not_overwritten_later(tmp_path):
    write(tmp_path / "a", [np.arange(5000) % 1000])
    loader = TokenLoader(tmp_path / "a", seq_len=16, batch_size=2, prefetch=2, num_threads=2)
    kept = [next(loader) for _ in range(20)]
    copies = [{k: v.clone() for k, v in b.items()} for b in kept]
    for _ in range(20):
        next(loader)
    for b, c in zip(kept, copies):
        assert all(torch.equal(b[k], c[k]) for k in b)


def test_sequential_mode_is_one_pass_per_iteration(tmp_path):
    write(tmp_path / "a", [np.arange(101) % 1000])
    loader = TokenLoader(tmp_path / "a", seq_len=10, batch_size=3, shuffle=False)
    assert len(loader) == 3  # 10 samples, drop_last
    first = [b["input_ids"][:, 0].tolist() for b in loader]
    assert first == [[0, 10, 20], [30, 40, 50], [60, 70, 80]]
    assert [b["input_ids"][:, 0].tolist() for b in loader] == first
    tail = TokenLoader(tmp_path / "a", seq_len=10, batch_size=3, shuffle=False, drop_last=False)
    assert [len(b["input_ids"]) for b in tail] == [3, 3, 3, 1]
    with pytest.raises(TypeError, match="endless"):
        len(TokenLoader(tmp_path / "a", seq_len=10, batch_size=3))


def test_state_dict_resume_and_refusals(tmp_path):
    write(tmp_path / "a", [np.arange(3000) % 1000])
    write(tmp_path / "b", [np.arange(2000) % 1000])
    a = TokenLoader(tmp_path / "a", seq_len=8, batch_size=4, seed=3)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    expected = [next(a)["input_ids"] for _ in range(5)]
    b = TokenLoader(tmp_path / "a", seq_len=8, batch_size=4, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(next(b)["input_ids"], e) for e in expected)
    with pytest.raises(ValueError, match="seed 3"):
        TokenLoader(tmp_path / "a", seq_len=8, batch_size=4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="different data stream"):
        TokenLoader(tmp_path / "b", seq_len=8, batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="different data stream"):
        TokenLoader(tmp_path / "a", seq_len=9, batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        b.load_state_dict({**state, "version": 99})


def test_state_survives_torch_save_weights_only(tmp_path):
    write(tmp_path / "a", [np.arange(3000) % 1000])
    a = TokenLoader(tmp_path / "a", seq_len=8, batch_size=4, seed=3)
    next(a)
    torch.save({"loader": a.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    b = TokenLoader(tmp_path / "a", seq_len=8, batch_size=4, seed=3)
    b.load_state_dict(state)
    assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


def test_position_ids_and_cu_seqlens_follow_documents(tmp_path):
    write(tmp_path / "a", [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]])
    loader = TokenLoader(tmp_path / "a", seq_len=6, batch_size=2, shuffle=False, position_ids=True, cu_seqlens=True)
    b = next(iter(loader))
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert b["cu_seqlens"].dtype == torch.int32
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 6, 12]
    assert b["max_seqlen"] == 6


def test_weighted_blend_uses_both_datasets(tmp_path):
    write(tmp_path / "a", [np.full(2000, 1)])
    write(tmp_path / "b", [np.full(2000, 2)])
    loader = TokenLoader({tmp_path / "a": 3, tmp_path / "b": 1}, seq_len=4, batch_size=8)
    firsts = torch.cat([next(loader)["input_ids"][:, 0] for _ in range(10)])
    assert (firsts == 1).sum().item() == 60 and (firsts == 2).sum().item() == 20
    with pytest.raises(ValueError, match="weight must be a positive number"):
        TokenLoader({tmp_path / "a": 0}, seq_len=4, batch_size=8)


def test_dataset_too_small_for_one_sample(tmp_path):
    write(tmp_path / "a", [[1, 2, 3]])
    with pytest.raises(ValueError, match="fewer than one sample"):
        TokenLoader(tmp_path / "a", seq_len=8, batch_size=1)


def test_corrupt_shard_in_a_directory_is_named_when_read(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write(d / "000", [np.arange(100)])
    bad = write(d / "001", [np.arange(100), np.arange(50)])
    raw = bytearray(bad.read_bytes())
    raw[-16:-8] = (10**9).to_bytes(8, "little")  # the second document's end offset
    bad.write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match=r"001: document index entry 1"):
        open_dataset(d)
    # Plain batches need only tokens; document boundaries are read, and checked, on demand.
    assert len(list(TokenLoader(d, seq_len=10, batch_size=4, shuffle=False))) == 6  # 250 tokens, 24 samples
    loader = TokenLoader(d, seq_len=10, batch_size=4, shuffle=False, position_ids=True)
    with pytest.raises(ShardFormatError, match="001"):
        list(loader)


def test_many_shards_with_few_file_handles(tmp_path):
    """Thousands of shards open under a 64-handle limit: nothing is held open per shard."""
    d = tmp_path / "many"
    d.mkdir()
    for i in range(3000):
        write(d / f"{i:05d}", [[i % 1000, (i + 1) % 1000, 7]])
    script = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        from ember.data import TokenLoader, open_dataset
        ds = open_dataset({str(d)!r}, max_open_shards=16)
        assert len(ds) == 3000 and ds[2999].tolist() == [999, 0, 7]
        loader = TokenLoader({str(d)!r}, seq_len=32, batch_size=8, max_open_shards=16)
        for _ in range(50):
            next(loader)
        assert loader._native.num_open <= 16, loader._native.num_open
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.gpu
def test_batches_are_pinned_with_cuda(tmp_path):
    write(tmp_path / "a", [np.arange(3000) % 1000])
    assert next(TokenLoader(tmp_path / "a", seq_len=8, batch_size=4))["input_ids"].is_pinned()


def test_rank_and_world_size_default_from_environment(tmp_path, monkeypatch):
    write(tmp_path / "a", [np.arange(3000) % 1000])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = TokenLoader(tmp_path / "a", seq_len=8, batch_size=2, seed=1)
    whole = TokenLoader(tmp_path / "a", seq_len=8, batch_size=4, seed=1, rank=0, world_size=1)
    assert (r1.rank, r1.world_size) == (1, 2)
    assert torch.equal(next(r1)["input_ids"], next(whole)["input_ids"][2:])
    with pytest.raises(ValueError, match="rank 2 is not in"):
        TokenLoader(tmp_path / "a", seq_len=8, batch_size=2, rank=2, world_size=2)


def test_fingerprint_follows_weights_not_their_scale(tmp_path):
    write(tmp_path / "a", [np.full(2000, 1)])
    write(tmp_path / "b", [np.full(2000, 2)])
    fp = lambda w: TokenLoader({tmp_path / "a": w[0], tmp_path / "b": w[1]}, seq_len=4, batch_size=8).fingerprint
    assert fp((3, 1)) == fp((0.75, 0.25))
    assert fp((3, 1)) != fp((1, 1))
