"""Property tests: ``TokenLoader`` against the independent reference of the sampling contract.

Every test here drives the real package (shards written with ``ShardWriter``,
batches read with ``TokenLoader``); ``reference_sampling`` supplies the expected
output, computed from the contract alone.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ember.data import ShardWriter, TokenLoader, open_dataset
from reference_sampling import Permutation, RefDataset, mix, normalise, reference_batches

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEDS = st.integers(0, 2**64 - 1)


# -- building datasets on disk ---------------------------------------------------


@dataclass
class DiskDataset:
    spec: object  # what TokenLoader gets for this dataset: a path or a list of paths
    ref: RefDataset
    key: str | None  # a single path usable as a key of a {path: weight} mapping


def _write_dataset(root: str, name: str, shards: list[list[list[int]]], vocab: int, layout: str) -> DiskDataset:
    """Writes ``shards`` under ``root`` as one dataset laid out as ``layout``:
    "file" (one shard file), "list" (list of shard files) or "dir" (a directory)."""
    if layout == "file":
        assert len(shards) == 1
        path = os.path.join(root, f"{name}.tok")
        _write_shard(path, shards[0], vocab)
        return DiskDataset(path, RefDataset.from_shards(shards), path)
    if layout == "list":
        paths = []
        for i, docs in enumerate(shards):
            # Names out of sort order: a list is read in the order given.
            p = os.path.join(root, f"{name}-{(len(shards) - i):03d}.tok")
            _write_shard(p, docs, vocab)
            paths.append(p)
        return DiskDataset(paths, RefDataset.from_shards(shards), None)
    d = os.path.join(root, name)
    os.mkdir(d)
    # A directory is read in file-name order: write under shuffled names and
    # give the reference the shards sorted by name.
    names = [f"s{(i * 7919) % 1009:04d}x.tok" for i in range(len(shards))]
    for n, docs in zip(names, shards):
        _write_shard(os.path.join(d, n), docs, vocab)
    with open(os.path.join(d, "meta.json"), "w") as f:
        f.write("{}")  # metadata files are not shards
    ordered = [docs for _, docs in sorted(zip(names, shards))]
    return DiskDataset(d, RefDataset.from_shards(ordered), d)


def _write_shard(path: str, docs: list[list[int]], vocab: int) -> None:
    with ShardWriter(path, vocab) as w:
        for doc in docs:
            w.add_document(np.asarray(doc, dtype=np.int64))


@st.composite
def dataset_shards(draw, seq_len: int, vocab: int, max_shards: int = 4, max_docs: int = 5, max_doc_len: int = 24):
    """A list of shards, each a list of documents (zero-length ones included),
    with at least one sample of ``seq_len + 1`` tokens in total."""
    n_shards = draw(st.integers(1, max_shards))
    doc = st.lists(st.integers(0, vocab - 1), min_size=0, max_size=max_doc_len)
    shards = [draw(st.lists(doc, min_size=0, max_size=max_docs)) for _ in range(n_shards)]
    total = sum(len(d) for s in shards for d in s)
    if total < seq_len + 1:
        extra = draw(st.lists(st.integers(0, vocab - 1), min_size=seq_len + 1 - total, max_size=2 * seq_len + 2 - total))
        where = draw(st.integers(0, n_shards - 1))
        shards[where].insert(draw(st.integers(0, len(shards[where]))), extra)
    return shards


@st.composite
def scenario(draw, max_datasets: int = 3):
    seq_len = draw(st.integers(1, 12))
    vocab = draw(st.sampled_from([50, 1000, 65536, 70000]))  # uint16 and uint32 shards
    k = draw(st.integers(1, max_datasets))
    datasets = []
    for _ in range(k):
        shards = draw(dataset_shards(seq_len, vocab))
        # A list of paths is one dataset, so it cannot be a key of a {path: weight} blend.
        layouts = ["dir"] + (["list"] if k == 1 else []) + (["file"] if len(shards) == 1 else [])
        datasets.append((shards, draw(st.sampled_from(layouts))))
    weights = [draw(st.floats(0.05, 20.0, allow_nan=False)) for _ in range(k)]
    return seq_len, vocab, datasets, weights


@contextmanager
def on_disk(vocab, datasets):
    with tempfile.TemporaryDirectory() as root:
        yield [_write_dataset(root, f"ds{i}", shards, vocab, layout) for i, (shards, layout) in enumerate(datasets)]


def loader_paths(disk: list[DiskDataset], weights, as_mapping: bool | None = None):
    if len(disk) == 1 and (not as_mapping or disk[0].key is None):
        return disk[0].spec
    return {d.key: w for d, w in zip(disk, weights)}


def ref_weights(weights, paths):
    """The weights the loader was given: a path or list of paths is one dataset of weight 1."""
    return weights if isinstance(paths, dict) else [1.0]


# -- comparing batches -------------------------------------------------------------


def to_numpy(batch: dict) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = (v.dtype, v.numpy().copy())
        else:
            out[k] = v
    return out


def assert_batch_equal(got: dict, want: dict, where: str = "") -> None:
    assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
    for k in ("input_ids", "labels", "position_ids"):
        if k in want:
            t = got[k]
            assert isinstance(t, torch.Tensor) and t.dtype == torch.int64, f"{where}: {k} is {type(t)} {getattr(t, 'dtype', None)}"
            np.testing.assert_array_equal(t.numpy(), want[k], err_msg=f"{where}: {k}")
    if "cu_seqlens" in want:
        t = got["cu_seqlens"]
        assert isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == 1, f"{where}: cu_seqlens {t.dtype} {t.shape}"
        np.testing.assert_array_equal(t.numpy(), want["cu_seqlens"], err_msg=f"{where}: cu_seqlens")
        assert int(got["max_seqlen"]) == want["max_seqlen"], f"{where}: max_seqlen {got['max_seqlen']} != {want['max_seqlen']}"


def assert_batches_equal(got: list[dict], want: list[dict], where: str = "") -> None:
    assert len(got) == len(want), f"{where}: {len(got)} batches, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_batch_equal(g, w, f"{where} batch {i}")


def take(loader, n: int) -> list[dict]:
    out = []
    it = iter(loader)
    for _ in range(n):
        out.append(next(it))
    return out


# -- the tests ------------------------------------------------------------------------


def test_reference_constants_and_small_permutation_via_loader(tmp_path):
    """Pins the reference's mix() and checks the loader's order for a tiny dataset
    (10 samples, token i at stream position i) against it."""
    assert mix(0) == 0xE220A8397B1DCDAF
    L = 3
    path = tmp_path / "a.tok"
    _write_shard(str(path), [list(range(10 * L + 1))], 1000)
    for seed in (0, 1234, 2**64 - 1):
        loader = TokenLoader(str(path), L, 10, seed=seed, rank=0, world_size=1, num_threads=1)
        first, second = take(loader, 2)
        for epoch, b in enumerate((first, second)):
            ids = (b["input_ids"][:, 0] // L).tolist()
            assert ids == [Permutation(10, seed, 0, epoch).apply(i) for i in range(10)], (seed, epoch)
            assert sorted(ids) == list(range(10))


@settings(max_examples=100, **SETTINGS)
@given(sc=scenario(), data=st.data())
def test_shuffled_batches_match_reference(sc, data):
    seq_len, vocab, datasets, weights = sc
    batch_size = data.draw(st.integers(1, 4), "batch_size")
    world_size = data.draw(st.integers(1, 3), "world_size")
    rank = data.draw(st.integers(0, world_size - 1), "rank")
    seed = data.draw(SEEDS, "seed")
    position_ids = data.draw(st.booleans(), "position_ids")
    cu_seqlens = data.draw(st.booleans(), "cu_seqlens")
    n_batches = data.draw(st.integers(1, 6), "n_batches")
    as_mapping = data.draw(st.booleans(), "as_mapping")
    with on_disk(vocab, datasets) as disk:
        paths = loader_paths(disk, weights, as_mapping)
        loader = TokenLoader(
            paths,
            seq_len,
            batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
            prefetch=data.draw(st.integers(1, 3), "prefetch"),
            num_threads=data.draw(st.integers(1, 3), "num_threads"),
            max_open_shards=data.draw(st.sampled_from([1, 2, 256]), "max_open_shards"),
        )
        got = take(loader, n_batches)
        loader.close()
    want = reference_batches(
        [d.ref for d in disk],
        ref_weights(weights, paths),
        seq_len,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        num_batches=n_batches,
    )
    assert_batches_equal(got, want, "shuffled")
    for b in got:
        assert tuple(b["input_ids"].shape) == (batch_size, seq_len)


@settings(max_examples=80, **SETTINGS)
@given(sc=scenario(), data=st.data())
def test_sequential_pass_matches_reference(sc, data):
    seq_len, vocab, datasets, weights = sc
    batch_size = data.draw(st.integers(1, 4), "batch_size")
    world_size = data.draw(st.integers(1, 3), "world_size")
    rank = data.draw(st.integers(0, world_size - 1), "rank")
    drop_last = data.draw(st.booleans(), "drop_last")
    position_ids = data.draw(st.booleans(), "position_ids")
    cu_seqlens = data.draw(st.booleans(), "cu_seqlens")
    with on_disk(vocab, datasets) as disk:
        paths = loader_paths(disk, weights)
        refs = [d.ref for d in disk]
        total = sum(r.num_samples(seq_len) for r in refs)
        G = batch_size * world_size
        assume(not drop_last or total >= G)
        loader = TokenLoader(
            paths,
            seq_len,
            batch_size,
            seed=data.draw(SEEDS, "seed"),  # irrelevant in sequential mode
            rank=rank,
            world_size=world_size,
            shuffle=False,
            drop_last=drop_last,
            position_ids=position_ids,
            cu_seqlens=cu_seqlens,
        )
        first = list(loader)
        second = list(loader)  # a new iter() after the end starts a new pass
        n = len(loader)
    want = reference_batches(
        refs,
        [1.0] * len(refs),
        seq_len,
        batch_size,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        drop_last=drop_last,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
    )
    expected_batches = total // G if drop_last else -(-total // G)
    assert len(want) == expected_batches
    assert n == expected_batches
    assert_batches_equal(first, want, "sequential pass 1")
    assert_batches_equal(second, want, "sequential pass 2")


@settings(max_examples=60, **SETTINGS)
@given(sc=scenario(), data=st.data())
def test_world_size_invariance(sc, data):
    """Global batch b is the same whatever the split: concatenating every rank's
    micro-batch gives the batch of a single process with the whole global batch."""
    seq_len, vocab, datasets, weights = sc
    G = data.draw(st.sampled_from([1, 2, 3, 4, 6, 8]), "global_batch")
    splits = [(ws, G // ws) for ws in range(1, G + 1) if G % ws == 0]
    seed = data.draw(SEEDS, "seed")
    shuffle = data.draw(st.booleans(), "shuffle")
    n_batches = data.draw(st.integers(1, 4), "n_batches")
    with on_disk(vocab, datasets) as disk:
        paths = loader_paths(disk, weights)
        total = sum(d.ref.num_samples(seq_len) for d in disk)
        if not shuffle:
            n_batches = min(n_batches, total // G)
            assume(n_batches > 0)

        def run(ws, bs, rank):
            ld = TokenLoader(paths, seq_len, bs, seed=seed, rank=rank, world_size=ws, shuffle=shuffle, position_ids=True)
            return take(ld, n_batches)

        single = run(1, G, 0)
        for ws, bs in splits[1:]:
            per_rank = [run(ws, bs, r) for r in range(ws)]
            for b in range(n_batches):
                for key in ("input_ids", "labels", "position_ids"):
                    joined = torch.cat([per_rank[r][b][key] for r in range(ws)])
                    assert torch.equal(joined, single[b][key]), (ws, bs, b, key)


@settings(max_examples=60, **SETTINGS)
@given(sc=scenario(), data=st.data())
def test_resume_equals_uninterrupted(sc, data):
    seq_len, vocab, datasets, weights = sc
    G = data.draw(st.sampled_from([1, 2, 4, 6]), "global_batch")
    splits = [(ws, G // ws) for ws in range(1, G + 1) if G % ws == 0]
    ws_a, bs_a = data.draw(st.sampled_from(splits), "split_before")
    ws_b, bs_b = data.draw(st.sampled_from(splits), "split_after")
    seed = data.draw(SEEDS, "seed")
    shuffle = data.draw(st.booleans(), "shuffle")
    before = data.draw(st.integers(0, 5), "batches_before")
    after = data.draw(st.integers(1, 4), "batches_after")
    with on_disk(vocab, datasets) as disk:
        paths = loader_paths(disk, weights)
        refs = [d.ref for d in disk]
        total = sum(r.num_samples(seq_len) for r in refs)
        if not shuffle:
            assume((before + after) * G <= total)
        kw = dict(seed=seed, shuffle=shuffle, position_ids=True, cu_seqlens=True)
        # Interrupted run: rank 0 of the first split consumes `before` batches and saves.
        first = TokenLoader(paths, seq_len, bs_a, rank=0, world_size=ws_a, **kw)
        it = iter(first)
        for _ in range(before):
            next(it)
        state = first.state_dict()
        assert state["position"] == before * G
        assert state["seed"] == seed and state["seq_len"] == seq_len and state["shuffle"] == shuffle
        # The loader has prefetched ahead; the state must not depend on that.
        first.close()
        for r in range(ws_b):
            resumed = TokenLoader(paths, seq_len, bs_b, rank=r, world_size=ws_b, **kw)
            resumed.load_state_dict(dict(state))
            assert resumed.state_dict()["position"] == before * G
            got = take(resumed, after)
            assert resumed.position == (before + after) * G
            want = reference_batches(
                refs, ref_weights(weights, paths), seq_len, bs_b, rank=r, world_size=ws_b,
                start_position=before * G, num_batches=after, **kw,
            )
            assert_batches_equal(got, want, f"resumed rank {r}/{ws_b}")
            # ... and equals an uninterrupted loader of the same split.
            plain = TokenLoader(paths, seq_len, bs_b, rank=r, world_size=ws_b, **kw)
            uninterrupted = take(plain, before + after)[before:]
            for g, u in zip(got, uninterrupted):
                for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                    assert torch.equal(g[k], u[k]), k


@settings(max_examples=30, **SETTINGS)
@given(sc=scenario(), data=st.data())
def test_rewind_to_earlier_state_replays(sc, data):
    """Loading an earlier state into a loader that has run ahead replays the same batches."""
    seq_len, vocab, datasets, weights = sc
    batch_size = data.draw(st.integers(1, 3), "batch_size")
    seed = data.draw(SEEDS, "seed")
    a = data.draw(st.integers(0, 3), "a")
    b = data.draw(st.integers(1, 4), "b")
    with on_disk(vocab, datasets) as disk:
        paths = loader_paths(disk, weights)
        loader = TokenLoader(paths, seq_len, batch_size, seed=seed, rank=0, world_size=1)
        it = iter(loader)
        for _ in range(a):
            next(it)
        state = loader.state_dict()
        run1 = [next(it) for _ in range(b)]
        next(it)
        loader.load_state_dict(state)
        run2 = take(loader, b)
    for x, y in zip(run1, run2):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_blending_proportions_within_one(data):
    """After g global samples, dataset k has had w_k * g samples within one. Each
    dataset's tokens are all equal to its index, so a row shows where it came from."""
    k = data.draw(st.integers(2, 4), "k")
    weights = [data.draw(st.floats(0.01, 100.0), f"w{i}") for i in range(k)]
    seq_len = data.draw(st.integers(1, 4), "seq_len")
    sizes = [data.draw(st.integers(1, 40), f"n{i}") for i in range(k)]  # samples per dataset (epochs wrap)
    batch_size = data.draw(st.integers(1, 5), "batch_size")
    steps = data.draw(st.integers(1, 40), "steps")
    seed = data.draw(SEEDS, "seed")
    with tempfile.TemporaryDirectory() as root:
        paths = {}
        for i in range(k):
            p = os.path.join(root, f"d{i}.tok")
            _write_shard(p, [[i] * (sizes[i] * seq_len + 1)], 16)
            paths[p] = weights[i]
        loader = TokenLoader(paths, seq_len, batch_size, seed=seed, rank=0, world_size=1)
        rows = torch.cat([b["input_ids"][:, 0] for b in take(loader, steps)]).tolist()
    w = normalise(weights)
    counts = [0] * k
    for g, ds in enumerate(rows, start=1):
        counts[ds] += 1
        for j in range(k):
            assert abs(counts[j] - w[j] * g) <= 1 + 1e-9, (g, counts, w)
    want = reference_batches(
        [RefDataset.from_shards([[[i] * (sizes[i] * seq_len + 1)]]) for i in range(k)],
        weights, seq_len, batch_size, seed=seed, num_batches=steps,
    )
    assert rows == [int(x) for b in want for x in b["input_ids"][:, 0]]


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_each_epoch_is_a_permutation(data):
    """Token value = dataset * 10000 + stream position, so each row names its sample.
    Within each dataset, every run of n_k consecutive draws (an epoch) is a
    permutation of its n_k samples."""
    k = data.draw(st.integers(1, 3), "k")
    seq_len = data.draw(st.integers(1, 5), "seq_len")
    sizes = [data.draw(st.integers(1, 70), f"n{i}") for i in range(k)]
    weights = [data.draw(st.floats(0.1, 10.0), f"w{i}") for i in range(k)]
    seed = data.draw(SEEDS, "seed")
    epochs = data.draw(st.integers(1, 3), "epochs")
    with tempfile.TemporaryDirectory() as root:
        paths = {}
        for i in range(k):
            p = os.path.join(root, f"d{i}.tok")
            n_tok = sizes[i] * seq_len + 1 + data.draw(st.integers(0, seq_len - 1), f"slack{i}")
            _write_shard(p, [[i * 10000 + t for t in range(n_tok)]], 70000)
            paths[p] = weights[i]
        # Enough draws for `epochs` epochs of every dataset.
        w = normalise(weights)
        need = max(int((epochs * n + 2) / wk) + 2 for n, wk in zip(sizes, w))
        batch = 64
        loader = TokenLoader(paths if k > 1 else next(iter(paths)), seq_len, batch, seed=seed, rank=0, world_size=1)
        steps = -(-need // batch)
        rows = torch.cat([b["input_ids"][:, 0] for b in take(loader, steps)]).tolist()
    per_ds = [[] for _ in range(k)]
    for t in rows:
        ds, pos = divmod(t, 10000)
        assert pos % seq_len == 0
        per_ds[ds].append(pos // seq_len)
    for i in range(k):
        n = sizes[i]
        assert len(per_ds[i]) >= epochs * n
        for e in range(epochs):
            block = per_ds[i][e * n : (e + 1) * n]
            assert sorted(block) == list(range(n)), (i, e)
            assert block == [Permutation(n, seed, i if k > 1 else 0, e).apply(c) for c in range(n)]


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_sequential_covers_every_sample_once(data):
    k = data.draw(st.integers(1, 3), "k")
    seq_len = data.draw(st.integers(1, 5), "seq_len")
    sizes = [data.draw(st.integers(1, 30), f"n{i}") for i in range(k)]
    batch_size = data.draw(st.integers(1, 4), "batch_size")
    world_size = data.draw(st.integers(1, 3), "world_size")
    drop_last = data.draw(st.booleans(), "drop_last")
    G = batch_size * world_size
    total = sum(sizes)
    with tempfile.TemporaryDirectory() as root:
        paths = {}
        for i in range(k):
            p = os.path.join(root, f"d{i}.tok")
            _write_shard(p, [[i * 10000 + t for t in range(sizes[i] * seq_len + 1)]], 70000)
            paths[p] = float(i + 1)
        spec = paths if k > 1 else next(iter(paths))
        per_rank = []
        for r in range(world_size):
            ld = TokenLoader(spec, seq_len, batch_size, rank=r, world_size=world_size, shuffle=False, drop_last=drop_last)
            per_rank.append(list(ld))
    n_batches = {len(b) for b in per_rank}
    assert n_batches == {total // G if drop_last else -(-total // G)}, "every rank yields the same number of batches"
    seen = []
    for b in range(n_batches.pop()):
        for r in range(world_size):
            seen += per_rank[r][b]["input_ids"][:, 0].tolist()
    order = [i * 10000 + j * seq_len for i in range(k) for j in range(sizes[i])]
    expect = order[: (total // G) * G] if drop_last else order
    assert seen == expect


def test_n_equals_one_and_tiny_datasets(tmp_path):
    """Datasets with a single sample (Permutation over n = 1, bits clamped to 2)."""
    for L in (1, 2, 7):
        for extra in range(L):
            p = tmp_path / f"one-{L}-{extra}.tok"
            toks = list(range(5, 5 + L + 1 + extra))
            _write_shard(str(p), [toks[:1], [], toks[1:]], 1000)
            ld = TokenLoader(str(p), L, 3, seed=99, rank=0, world_size=1, position_ids=True, cu_seqlens=True)
            got = take(ld, 2)
            want = reference_batches([RefDataset.from_shards([[toks[:1], [], toks[1:]]])], [1.0], L, 3,
                                     seed=99, position_ids=True, cu_seqlens=True, num_batches=2)
            assert_batches_equal(got, want, f"L={L} extra={extra}")


def test_position_ids_and_cu_seqlens_hand_example(tmp_path):
    """A hand-worked example of the document-boundary outputs, independent of the reference."""
    d = tmp_path / "d"
    d.mkdir()
    _write_shard(str(d / "a.tok"), [[1, 2, 3], [], [4, 5]], 100)  # stream 0..4, docs at 0, 3
    _write_shard(str(d / "b.tok"), [[6, 7, 8, 9, 10, 11]], 100)  # shard start at 5
    ld = TokenLoader(str(d), 4, 2, rank=0, world_size=1, shuffle=False, position_ids=True, cu_seqlens=True)
    (b,) = list(ld)  # 11 tokens -> 2 samples of 4
    assert b["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert b["labels"].tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert b["cu_seqlens"].tolist() == [0, 3, 4, 5, 8]
    assert b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 3


# -- state_dict validation -------------------------------------------------------------


@pytest.fixture
def two_datasets(tmp_path):
    a, b = tmp_path / "a.tok", tmp_path / "b.tok"
    _write_shard(str(a), [list(range(100))], 1000)
    _write_shard(str(b), [list(range(200))], 1000)
    return str(a), str(b)


def test_state_from_other_seed_or_stream_is_rejected(two_datasets):
    a, b = two_datasets
    base = TokenLoader({a: 1.0, b: 2.0}, 4, 2, seed=1, rank=0, world_size=1)
    take(base, 3)
    state = base.state_dict()
    assert set(state) >= {"version", "seed", "position", "fingerprint", "seq_len", "shuffle"}
    same = TokenLoader({a: 1.0, b: 2.0}, 4, 2, seed=1, rank=0, world_size=1)
    same.load_state_dict(state)  # accepted
    assert same.position == 6
    for other in (
        TokenLoader({a: 1.0, b: 2.0}, 4, 2, seed=2, rank=0, world_size=1),  # seed
        TokenLoader({a: 1.0, b: 2.0}, 5, 2, seed=1, rank=0, world_size=1),  # seq_len
        TokenLoader({a: 1.0}, 4, 2, seed=1, rank=0, world_size=1),  # datasets
        TokenLoader({b: 1.0, a: 2.0}, 4, 2, seed=1, rank=0, world_size=1),  # dataset order
        TokenLoader({a: 1.0, b: 2.0}, 4, 2, seed=1, rank=0, world_size=1, shuffle=False),  # mode
    ):
        with pytest.raises(ValueError):
            other.load_state_dict(state)
    with pytest.raises(ValueError):
        same.load_state_dict({**state, "version": 999})
    with pytest.raises(ValueError):
        same.load_state_dict({k: v for k, v in state.items() if k != "fingerprint"})


def test_state_from_other_weights_is_rejected(two_datasets):
    a, b = two_datasets
    base = TokenLoader({a: 1.0, b: 2.0}, 4, 2, seed=1, rank=0, world_size=1)
    take(base, 3)
    state = base.state_dict()
    other = TokenLoader({a: 3.0, b: 1.0}, 4, 2, seed=1, rank=0, world_size=1)
    with pytest.raises(ValueError):
        other.load_state_dict(state)


def test_loader_reads_what_open_dataset_reads(tmp_path):
    """The loader's sequential stream is the documents of open_dataset, concatenated."""
    rng = np.random.default_rng(5)
    d = tmp_path / "d"
    d.mkdir()
    docs_all = []
    for s in range(3):
        docs = [rng.integers(0, 70000, rng.integers(0, 30)).tolist() for _ in range(6)]
        _write_shard(str(d / f"{s}.tok"), docs, 70000)
        docs_all += docs
    ds = open_dataset(str(d))
    assert len(ds) == len(docs_all) and ds.dtype == np.uint32
    stream = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    assert stream.tolist() == [t for doc in docs_all for t in doc]
    L = 5
    ld = TokenLoader(str(d), L, 1, rank=0, world_size=1, shuffle=False)
    rows = [b["input_ids"][0].tolist() + b["labels"][0, -1:].tolist() for b in ld]
    assert rows == [stream[j * L : j * L + L + 1].tolist() for j in range((len(stream) - 1) // L)]


@settings(max_examples=8, **SETTINGS)
@given(
    n_tokens=st.integers(2**17, 2**20),
    seq_len=st.sampled_from([1, 3, 8, 100]),
    seed=SEEDS,
    epoch=st.integers(0, 3),
    offset=st.integers(0, 10**6),
)
def test_large_dataset_order_and_far_resume(n_tokens, seq_len, seed, epoch, offset):
    """Large n (Feistel domains of up to 20 bits): the first draws and draws after a
    resume deep into a later epoch follow Permutation(n, seed, 0, epoch)."""
    n = (n_tokens - 1) // seq_len
    with tempfile.TemporaryDirectory() as root:
        p = os.path.join(root, "big.tok")
        with ShardWriter(p, 2**32) as w:
            w.add_document(np.arange(n_tokens, dtype=np.int64))
        loader = TokenLoader(p, seq_len, 64, seed=seed, rank=0, world_size=1, position_ids=True)
        first = next(iter(loader))
        start = epoch * n + offset % n
        resumed = TokenLoader(p, seq_len, 32, seed=seed, rank=1, world_size=2)
        resumed.load_state_dict({**loader.state_dict(), "position": start})
        later = take(resumed, 2)
    ids = (first["input_ids"][:, 0] // seq_len).tolist()
    assert ids == [Permutation(n, seed, 0, 0).apply(c) for c in range(64)]
    assert torch.equal(first["labels"], first["input_ids"] + 1)
    assert torch.equal(first["position_ids"], torch.arange(seq_len).expand(64, seq_len))
    got = torch.cat([b["input_ids"][:, 0] for b in later]).tolist()
    want = []
    for b in range(2):
        for c in range(start + 64 * b + 32, start + 64 * b + 64):  # rank 1's half of each global batch
            want.append(Permutation(n, seed, 0, c // n).apply(c % n) * seq_len)
    assert got == want
