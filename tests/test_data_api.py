"""The Python data API as a user meets it: writing shards, reading them, loading batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ember import _native
from ember.data import ShardFormatError, ShardWriter, TokenLoader, check_vocabulary, open_dataset


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


def test_check_vocabulary_names_the_shard_and_the_key(tmp_path):
    small = write(tmp_path / "small", [[1, 2, 3]], vocab=1000)
    big = write(tmp_path / "big", [[1, 2, 3]], vocab=50000)
    check_vocabulary(small, 1000, "data.train")
    check_vocabulary([small], 32000, "data.train")
    with pytest.raises(ValueError, match=r"big: tokenized with a vocabulary of 50000.*vocab_size 32000 \(data.train\)"):
        check_vocabulary(big, 32000, "data.train")
    with pytest.raises(ValueError, match=r"big: .*\(data.val\)"):
        check_vocabulary([small, big], 32000, "data.val")
    with pytest.raises(ValueError, match=r"big: .*\(data.train\)"):
        check_vocabulary({small: 1.0, big: 2.0}, 32000, "data.train")
    check_vocabulary({small: 1.0, big: 2.0}, 50000, "data.train")


def test_shards_and_documents_are_described_by_name(tmp_path):
    path = write(tmp_path / "a", [[1, 2, 3], [4, 5]], vocab=1000)
    native = _native.Dataset([str(path)])
    (shard,) = native.shards()
    assert (shard.path, shard.format, shard.dtype, shard.num_tokens, shard.vocab_size) == (path, "ember", "uint16", 5, 1000)
    assert repr(shard) == f"ShardInfo(path={str(path)!r}, format='ember', dtype='uint16', num_tokens=5, vocab_size=1000)"
    loc = native.doc_location(1)
    assert (loc.path, loc.length, loc.dtype) == (str(path), 2, "uint16")
    assert path.read_bytes()[loc.offset : loc.offset + 4] == np.array([4, 5], "<u2").tobytes()
    assert repr(loc) == f"DocLocation(path={str(path)!r}, offset={loc.offset}, length=2, dtype='uint16')"
    with pytest.raises(AttributeError):
        loc.length = 3
    with pytest.raises(IndexError, match="out of range for 2 documents"):
        native.doc_location(2)


def test_batches_are_the_memory_the_loader_filled(tmp_path, monkeypatch):
    stream = np.arange(1000) % 1000
    write(tmp_path / "a", [stream])
    given = []

    def spy(*arrays, **named):
        given.append([*arrays, *named.values()])
        return real(*arrays, **named)

    real = _native.BatchBuffers
    monkeypatch.setattr(_native, "BatchBuffers", spy)
    loader = TokenLoader(tmp_path / "a", seq_len=8, batch_size=2, shuffle=False, prefetch=2, position_ids=True, cu_seqlens=True)
    batch = next(iter(loader))
    filled = [a.__array_interface__["data"][0] for a in given[0]]
    assert filled == [batch[k].data_ptr() for k in ("input_ids", "labels", "position_ids", "cu_seqlens")]
    assert batch["input_ids"].tolist() == [stream[0:8].tolist(), stream[8:16].tolist()]
    assert batch["labels"].tolist() == [stream[1:9].tolist(), stream[9:17].tolist()]


def arrays(b, seq_len, fill=-1):
    """int64 input_ids, labels, position_ids and int32 cu_seqlens for a batch of b rows."""
    tokens = np.full((3, b, seq_len), fill, np.int64)
    return tokens[0], tokens[1], tokens[2], np.full(b * seq_len + 1, fill, np.int32)


def test_native_loader_refuses_arrays_it_cannot_fill(tmp_path):
    write(tmp_path / "a", [np.arange(1000) % 1000])
    B, L = 2, 8
    loader = _native.Loader([([str(tmp_path / "a")], 1.0)], L, B, shuffle=False)

    def refused(error, match, **change):
        ids, labels, pos, cu = arrays(B, L)
        given = {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu, **change}
        with pytest.raises(error, match=match):
            loader.submit([_native.BatchBuffers(given.pop("input_ids"), given.pop("labels"), **given)])

    backing = np.full(B * L + 8, -1, np.int64)
    refused(ValueError, r"input_ids: holds 15 values; a batch of 2 rows of 8 tokens needs 16", input_ids=backing[: B * L - 1])
    assert (backing == -1).all()  # nothing written past the short array
    refused(ValueError, r"labels: holds 17 values", labels=np.zeros(B * L + 1, np.int64))
    refused(ValueError, r"cu_seqlens: holds 16 values; .* needs 17", cu_seqlens=np.zeros(B * L, np.int32))
    refused(ValueError, r"labels: the array is not C-contiguous \(shape \(2, 8\), strides \(128, 16\)\)", labels=np.zeros((B, 2 * L), np.int64)[:, ::2])
    refused(ValueError, r"position_ids: the array is not C-contiguous", position_ids=np.zeros((L, B), np.int64).T)
    refused(TypeError, r"labels: expected int64 elements \(typestr '<i8'\), got typestr '<i4'", labels=np.zeros((B, L), np.int32))
    refused(TypeError, r"cu_seqlens: expected int32 elements", cu_seqlens=np.zeros(B * L + 1, np.int64))
    refused(TypeError, r"input_ids: expected a writable int64 numpy.ndarray.*got Tensor", input_ids=torch.zeros(B, L, dtype=torch.int64))
    refused(TypeError, r"labels: .*got bytearray", labels=bytearray(B * L * 8))
    read_only = np.zeros((B, L), np.int64)
    read_only.flags.writeable = False
    refused(ValueError, r"labels: the array is read-only", labels=read_only)
    unaligned = np.zeros(B * L * 8 + 1, np.uint8)[1:].view(np.int64)
    refused(ValueError, r"input_ids: address .* is not aligned for int64", input_ids=unaligned)
    shared = np.zeros((B, L), np.int64)
    refused(ValueError, r"labels of batch 0 of this call shares memory with input_ids", input_ids=shared, labels=shared)
    assert loader.planned_position == 0  # a refused call plans nothing

    # Arrays still being filled cannot be handed out again.
    ids, labels, pos, cu = arrays(B, L)
    (queued,) = loader.submit([_native.BatchBuffers(ids, labels)])
    refused(ValueError, r"input_ids of batch 0 of this call shares memory with labels of a batch still queued", input_ids=labels)
    loader.wait(queued.ticket)
    assert ids.tolist() == [list(range(0, 8)), list(range(8, 16))]


def test_native_loader_writes_only_into_numpy_arrays_themselves(tmp_path):
    # Anything else can state any address, and holding it does not hold that memory.
    write(tmp_path / "a", [np.arange(1000) % 1000])
    B, L = 2, 8
    loader = _native.Loader([([str(tmp_path / "a")], 1.0)], L, B, shuffle=False, num_threads=1)
    victim = np.full((B, L), -1, np.int64)
    labels = np.full((B, L), -1, np.int64)
    forged = {"version": 3, "shape": (B, L), "typestr": "<i8", "data": (victim.ctypes.data, False), "strides": None}

    class Forged:
        __array_interface__ = forged

    class Lying(np.ndarray):
        @property
        def __array_interface__(self):
            return forged

    class Plain(np.ndarray):
        pass

    impostors = {"Forged": Forged(), "Lying": np.zeros((B, L), np.int64).view(Lying), "Plain": np.zeros((B, L), np.int64).view(Plain)}
    for kind, impostor in impostors.items():
        with pytest.raises(TypeError, match=rf"input_ids: expected a writable int64 numpy.ndarray \(not a subclass\).*got {kind}$"):
            loader.submit([_native.BatchBuffers(impostor, labels)])
        with pytest.raises(TypeError, match=rf"labels: .*got {kind}$"):
            loader.submit([_native.BatchBuffers(np.zeros((B, L), np.int64), impostor)])
    assert loader.planned_position == 0

    # One thread fills batches in order: once this one is done, nothing refused above was queued.
    tensors = [torch.full((B, L), -1, dtype=torch.int64) for _ in range(2)]
    (planned,) = loader.submit([_native.BatchBuffers(tensors[0].numpy(), tensors[1].numpy())])
    loader.wait(planned.ticket)
    assert tensors[0].tolist() == [list(range(0, 8)), list(range(8, 16))]
    assert (victim == -1).all() and (labels == -1).all()


def test_native_loader_fills_the_arrays_in_place(tmp_path):
    write(tmp_path / "a", [[1, 2, 3], [4, 5], np.arange(6, 40)])
    B, L = 2, 6
    loader = _native.Loader([([str(tmp_path / "a")], 1.0)], L, B, shuffle=False)
    tensors = [torch.from_numpy(a) for a in arrays(B, L)]
    buffers = _native.BatchBuffers(*(t.numpy() for t in tensors[:2]), position_ids=tensors[2].numpy(), cu_seqlens=tensors[3].numpy())
    (planned,) = loader.submit([buffers])
    assert (planned.ticket, planned.rows, planned.start, planned.end) == (0, 2, 0, 2)
    assert repr(planned) == "PlannedBatch(ticket=0, rows=2, start=0, end=2)"
    filled = loader.wait(planned.ticket)
    assert (filled.num_cu_seqlens, filled.max_seqlen) == (5, 6)
    assert repr(filled) == "FilledBatch(num_cu_seqlens=5, max_seqlen=6)"
    ids, labels, pos, cu = tensors
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    assert labels.tolist() == [[2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert cu[:5].tolist() == [0, 3, 5, 6, 12] and (cu[5:] == -1).all()
    with pytest.raises(ValueError, match="unknown batch ticket 0"):
        loader.wait(planned.ticket)
