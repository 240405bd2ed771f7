"""Shard formats: Megatron ``.bin/.idx`` and llm.c files written here from the
public format descriptions, Ember shards from ``ShardWriter``; round trips,
zero-copy views, mixed directories feeding ``TokenLoader``, and malformed files.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.data import ShardFormatError, ShardWriter, TokenLoader, open_dataset
from reference_sampling import RefDataset, llmc_doc_starts, reference_batches

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- writers for the foreign formats, from their public descriptions ----------------

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
INTEGER_CODES = [1, 2, 3, 4, 5, 8]
LLMC_V1 = (20240520, 1, np.uint16, 50256)
LLMC_V7 = (20240801, 7, np.uint32, 128000)


def write_megatron(prefix, docs, code: int, *, doc_indices=None, modes: bool = False) -> tuple[Path, Path]:
    """Megatron-LM MMapIndexedDataset: ``prefix.bin`` (raw tokens) and ``prefix.idx``."""
    prefix = Path(prefix)
    dt = np.dtype(MEGATRON_DTYPES[code]).newbyteorder("<")
    arrays = [np.asarray(d).astype(dt) for d in docs]
    lengths = np.array([len(a) for a in arrays], dtype="<i4")
    pointers = np.zeros(len(arrays), dtype="<i8")
    if len(arrays):
        pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * dt.itemsize
    if doc_indices is None:
        doc_indices = np.arange(len(arrays) + 1)
    doc_indices = np.asarray(doc_indices, dtype="<i8")
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    with open(bin_path, "wb") as f:
        for a in arrays:
            f.write(a.tobytes())
    with open(idx_path, "wb") as f:
        f.write(MEGATRON_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(arrays)))
        f.write(struct.pack("<Q", len(doc_indices)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_indices.tobytes())
        if modes:
            f.write(np.zeros(len(arrays), np.int8).tobytes())
    return bin_path, idx_path


def write_llmc(path, tokens, version=LLMC_V1, *, num_tokens: int | None = None) -> Path:
    magic, ver, dt, _ = version
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = magic, ver
    header[2] = len(tokens) if num_tokens is None else num_tokens
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens).astype(np.dtype(dt).newbyteorder("<")).tobytes())
    return Path(path)


def write_ember(path, docs, vocab=1000) -> Path:
    with ShardWriter(path, vocab) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=np.int64))
    return Path(path)


def ember_offsets_offset(num_tokens: int, itemsize: int) -> int:
    return (64 + num_tokens * itemsize + 7) // 8 * 8


def patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def docs_of(ds) -> list[list[int]]:
    return [ds[i].tolist() for i in range(len(ds))]


def raises_format_error(path_in_message, *fragments, fn):
    with pytest.raises(ShardFormatError) as ei:
        fn()
    msg = str(ei.value)
    assert os.fspath(path_in_message) in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert isinstance(ei.value, ValueError)
    return msg


def open_all(path, **kw):
    """Opens and reads every document (forces every lazy code path)."""
    ds = open_dataset(path, **kw)
    for i in range(len(ds)):
        np.asarray(ds[i]).sum()
    return ds


# -- Megatron ------------------------------------------------------------------------


def _random_docs(rng, dt, n_docs=7, max_len=20):
    info = np.iinfo(dt)
    lo, hi = max(int(info.min), -(2**40)), min(int(info.max), 2**40)
    docs = [rng.integers(lo, hi, size=int(rng.integers(0, max_len)), endpoint=True).astype(dt) for _ in range(n_docs)]
    docs[1] = docs[1][:0]  # a zero-length document
    docs[2] = np.concatenate([[info.max, info.min], docs[2]]).astype(dt)  # the extremes of the dtype
    return docs


@pytest.mark.parametrize("code", INTEGER_CODES)
def test_megatron_integer_dtypes_round_trip(tmp_path, code):
    dt = MEGATRON_DTYPES[code]
    rng = np.random.default_rng(code)
    docs = _random_docs(rng, dt)
    bin_path, idx_path = write_megatron(tmp_path / "corpus_text_document", docs, code)
    prefix = tmp_path / "corpus_text_document"
    for p in (bin_path, idx_path, prefix, str(prefix), str(bin_path)):
        ds = open_dataset(p)
        assert ds.format == "megatron"
        assert ds.dtype == np.dtype(dt)
        assert len(ds) == len(docs)
        assert ds.num_tokens == sum(len(d) for d in docs)
        for i, d in enumerate(docs):
            got = ds[i]
            assert got.dtype == np.dtype(dt)
            np.testing.assert_array_equal(got, d)


@pytest.mark.parametrize("code", [6, 7])
def test_megatron_float_dtypes_open(tmp_path, code):
    dt = MEGATRON_DTYPES[code]
    docs = [np.arange(5, dtype=dt) * 3, np.zeros(0, dt), np.array([7.0, 8.0], dt)]
    write_megatron(tmp_path / "f", docs, code)
    ds = open_dataset(tmp_path / "f")
    assert ds.dtype == np.dtype(dt) and len(ds) == 3
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    batch = next(iter(TokenLoader(tmp_path / "f", 3, 1, rank=0, world_size=1, shuffle=False)))
    assert batch["input_ids"].tolist() == [[0, 3, 6]]


def test_megatron_with_sequence_modes_and_document_indices(tmp_path):
    docs = [np.arange(4), np.arange(10, 13), np.arange(20, 29)]
    write_megatron(tmp_path / "mm", docs, 4, doc_indices=[0, 2, 3], modes=True)
    ds = open_dataset(tmp_path / "mm")
    assert docs_of(ds) == [d.tolist() for d in docs]


def test_megatron_in_directory_is_named_by_idx(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_megatron(d / "a", [np.arange(3), np.arange(5, 9)], 8)
    write_megatron(d / "b", [np.arange(100, 102)], 8)
    ds = open_dataset(d)
    assert len(ds.shards) == 2 and all(s.suffix == ".idx" for s in ds.shards)
    assert docs_of(ds) == [[0, 1, 2], [5, 6, 7, 8], [100, 101]]


# -- llm.c -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [LLMC_V1, LLMC_V7], ids=["v1", "v7"])
def test_llmc_documents_split_at_delimiter(tmp_path, version):
    _, _, dt, delim = version
    rng = np.random.default_rng(1)
    docs = [[delim] + rng.integers(0, 1000, rng.integers(0, 12)).tolist() for _ in range(6)]
    docs.insert(3, [delim])  # a document that is just its delimiter
    flat = [t for d in docs for t in d]
    p = write_llmc(tmp_path / "train_000001.bin", flat, version)
    ds = open_dataset(p)
    assert ds.format == "llmc" and ds.dtype == np.dtype(dt)
    assert ds.num_tokens == len(flat)
    assert docs_of(ds) == docs
    assert ds[0][0] == delim


@pytest.mark.parametrize("version", [LLMC_V1, LLMC_V7], ids=["v1", "v7"])
def test_llmc_custom_delimiter_and_leading_non_delimiter(tmp_path, version):
    tokens = [5, 6, 7, 0, 1, 0, 0, 0, 9, 3]
    p = write_llmc(tmp_path / "x.bin", tokens, version)
    ds = open_dataset(p, llmc_delimiter=0)
    starts = llmc_doc_starts(np.array(tokens), 0)
    assert starts == [0, 3, 5, 6, 7]
    bounds = starts + [len(tokens)]
    assert docs_of(ds) == [tokens[a:b] for a, b in zip(bounds, bounds[1:])]
    # With the default delimiter (absent here), the whole shard is one document.
    assert docs_of(open_dataset(p)) == [tokens]
    # The loader uses the same boundaries for position_ids.
    ld = TokenLoader(p, 3, 3, rank=0, world_size=1, shuffle=False, position_ids=True, llmc_delimiter=0)
    (b,) = list(ld)
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0], [0, 0, 1]]
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 1, 0], [0, 0, 9]]


def test_llmc_empty_shard(tmp_path):
    p = write_llmc(tmp_path / "e.bin", [], LLMC_V7)
    ds = open_dataset(p)
    assert len(ds) == 0 and ds.num_tokens == 0


# -- views ----------------------------------------------------------------------------------


def _three_formats(tmp_path):
    e = write_ember(tmp_path / "e.tok", [[1, 2, 3], [4, 5], [6]], 70000)  # uint32
    _, m = write_megatron(tmp_path / "m", [np.arange(3), np.arange(10, 15), np.arange(3)], 3)
    lc = write_llmc(tmp_path / "l.bin", [50256, 1, 2, 50256, 3, 50256, 4, 5, 6], LLMC_V1)
    return {"ember": e, "megatron": m, "llmc": lc}


def test_documents_are_zero_copy_read_only_views(tmp_path):
    for fmt, path in _three_formats(tmp_path).items():
        ds = open_dataset(path)
        assert ds.format == fmt
        a, a2, b = ds[0], ds[0], ds[1]
        assert np.shares_memory(a, a2), fmt  # two calls view the same mapped bytes
        assert not a.flags.owndata and not a.flags.writeable, fmt
        # Consecutive documents sit back to back in one mapping of the file.
        assert b.ctypes.data - a.ctypes.data == a.nbytes, fmt
        with pytest.raises(ValueError):
            a[0] = 99
        # Somewhere down the chain of bases is the file mapping itself.
        chain, x = [], a
        while x is not None:
            chain.append(x)
            x = getattr(x, "base", None)
        assert any(isinstance(c, (np.memmap, mmap.mmap, memoryview)) for c in chain), (fmt, [type(c) for c in chain])


def test_empty_document_view_is_read_only(tmp_path):
    ds = open_dataset(write_ember(tmp_path / "e.tok", [[1], [], [2]]))
    empty = ds[1]
    assert empty.shape == (0,) and empty.dtype == ds.dtype
    assert not empty.flags.writeable


def test_indexing(tmp_path):
    for fmt, path in _three_formats(tmp_path).items():
        ds = open_dataset(path)
        n = len(ds)
        assert n == 3, fmt
        for i in range(n):
            np.testing.assert_array_equal(ds[i - n], ds[i])
            np.testing.assert_array_equal(ds[np.int64(i)], ds[i])
        for bad in (n, n + 5, -n - 1, 2**63):
            with pytest.raises(IndexError):
                ds[bad]


# -- mixed directories feeding the loader ------------------------------------------------------


@st.composite
def mixed_directory(draw):
    """Up to five shards of random formats under random names; each item is
    (name, format, docs, extra) describing one shard."""
    n = draw(st.integers(1, 5))
    names = draw(st.lists(st.text("abcdefgh0123", min_size=1, max_size=6), min_size=n, max_size=n, unique=True))
    doc = st.lists(st.integers(0, 3000), max_size=15)
    shards = []
    for name in names:
        fmt = draw(st.sampled_from(["ember", "megatron", "llmc1", "llmc7"]))
        docs = draw(st.lists(doc, max_size=5))
        if fmt.startswith("llmc"):
            # Every document starts with the delimiter (7 here, passed as llmc_delimiter).
            docs = [[7] + [t for t in d if t != 7] for d in docs]
        extra = draw(st.sampled_from([3, 4, 8])) if fmt == "megatron" else None
        shards.append((name, fmt, docs, extra))
    return shards


def _materialise(d: Path, shards):
    """Writes the shards and returns (tokens, doc starts) per shard in directory order."""
    by_name = {}
    for name, fmt, docs, extra in shards:
        if fmt == "ember":
            write_ember(d / f"{name}.tok", docs, 70000 if name.startswith("a") else 4000)
            by_name[f"{name}.tok"] = docs
        elif fmt == "megatron":
            write_megatron(d / name, [np.array(x, dtype=np.int64) for x in docs], extra)
            by_name[f"{name}.idx"] = docs
        else:
            write_llmc(d / f"{name}.llmc", [t for x in docs for t in x], LLMC_V1 if fmt == "llmc1" else LLMC_V7)
            by_name[f"{name}.llmc"] = docs
    (d / "info.json").write_text("{}")
    (d / ".hidden").write_bytes(b"junk")
    return [by_name[k] for k in sorted(by_name)]


@settings(max_examples=80, **SETTINGS)
@given(shards=mixed_directory(), data=st.data())
def test_mixed_directory_matches_reference(shards, data):
    with tempfile.TemporaryDirectory() as root:
        d = Path(root) / "data"
        d.mkdir()
        ordered = _materialise(d, shards)
        all_docs = [doc for s in ordered for doc in s]
        ds = open_dataset(d, llmc_delimiter=7)
        assert docs_of(ds) == all_docs
        ref = RefDataset.from_shards(ordered)
        assert ds.num_tokens == ref.num_tokens
        seq_len = data.draw(st.integers(1, 8), "seq_len")
        if ref.num_samples(seq_len) == 0:
            with pytest.raises(ValueError):
                TokenLoader(d, seq_len, 1, rank=0, world_size=1, llmc_delimiter=7)
            return
        batch_size = data.draw(st.integers(1, 3), "batch_size")
        shuffle = data.draw(st.booleans(), "shuffle")
        seed = data.draw(st.integers(0, 2**64 - 1), "seed")
        kw = dict(seed=seed, rank=0, world_size=1, shuffle=shuffle, drop_last=False, position_ids=True, cu_seqlens=True)
        ld = TokenLoader(d, seq_len, batch_size, llmc_delimiter=7, **kw)
        n = 3 if shuffle else None
        got = list(ld) if not shuffle else [next(iter(ld)) for _ in range(n)]
    want = reference_batches([ref], [1.0], seq_len, batch_size, num_batches=n, **kw)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            np.testing.assert_array_equal(g[k].numpy(), w[k], err_msg=k)
        assert g["max_seqlen"] == w["max_seqlen"]


def test_views_survive_mapping_eviction(tmp_path):
    """More shards than either side keeps mapped at once: every view stays valid."""
    d = tmp_path / "many"
    d.mkdir()
    shards = []
    for i in range(70):
        docs = [[i, j, i + j] for j in range(i % 3)] + [[1000 + i]]
        write_ember(d / f"{i:03d}.tok", docs, 70000)
        shards.append(docs)
    expect = [doc for docs in shards for doc in docs]
    ds = open_dataset(d, max_open_shards=2)
    views = [ds[i] for i in range(len(ds))]
    views += [ds[i] for i in range(len(ds))]  # again, after evictions
    assert [v.tolist() for v in views] == expect + expect
    ld = TokenLoader(d, 4, 3, rank=0, world_size=1, shuffle=False, max_open_shards=1, position_ids=True, cu_seqlens=True)
    ref = RefDataset.from_shards(shards)
    want = reference_batches([ref], [1.0], 4, 3, shuffle=False, position_ids=True, cu_seqlens=True)
    got = list(ld)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            np.testing.assert_array_equal(g[k].numpy(), w[k], err_msg=k)


def test_empty_megatron_dataset(tmp_path):
    write_megatron(tmp_path / "e", [], 4)
    ds = open_dataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0
    with pytest.raises(IndexError):
        ds[0]
    with pytest.raises(ValueError):
        TokenLoader(tmp_path / "e", 2, 1, rank=0, world_size=1)


def test_list_of_shards_is_one_dataset_in_given_order(tmp_path):
    a = write_ember(tmp_path / "z.tok", [[1, 2], [3]])
    b = write_llmc(tmp_path / "a.bin", [50256, 9, 8], LLMC_V1)
    _, c = write_megatron(tmp_path / "m", [np.array([4, 5])], 8)
    ds = open_dataset([a, b, c])
    assert ds.format == "mixed"
    assert docs_of(ds) == [[1, 2], [3], [50256, 9, 8], [4, 5]]


# -- content decides, not the extension -----------------------------------------------------


def test_format_is_detected_by_content(tmp_path):
    src = write_ember(tmp_path / "orig.tok", [[1, 2, 3], [4]])
    for name in ("shard.bin", "shard", "shard.idx", "shard.json", "shard.npy"):
        p = tmp_path / name
        p.write_bytes(src.read_bytes())
        ds = open_dataset(p)
        assert ds.format == "ember" and docs_of(ds) == [[1, 2, 3], [4]], name
    lc = write_llmc(tmp_path / "tokens.idx", [50256, 1, 2], LLMC_V1)
    assert open_dataset(lc).format == "llmc"
    # An Ember shard named .bin beside an unrelated .idx still opens as Ember.
    write_megatron(tmp_path / "pair", [np.arange(3)], 8)
    (tmp_path / "pair.bin").write_bytes(src.read_bytes())
    assert open_dataset(tmp_path / "pair.bin").format == "ember"


# -- malformed files ------------------------------------------------------------------------


def test_missing_paths_raise_file_not_found(tmp_path):
    for p in (tmp_path / "nope.tok", tmp_path / "nope", tmp_path / "nope.bin", tmp_path / "nope.idx"):
        with pytest.raises(FileNotFoundError) as ei:
            open_dataset(p)
        assert str(p) in str(ei.value)
        with pytest.raises(FileNotFoundError):
            TokenLoader(p, 4, 1, rank=0, world_size=1)
    # A Megatron .idx whose .bin is missing.
    _, idx = write_megatron(tmp_path / "half", [np.arange(4)], 8)
    os.remove(tmp_path / "half.bin")
    with pytest.raises(FileNotFoundError) as ei:
        open_dataset(idx)
    assert "half.bin" in str(ei.value)


def test_empty_files(tmp_path):
    for name in ("empty.tok", "empty.bin", "empty.idx", "empty"):
        p = tmp_path / name
        p.write_bytes(b"")
        raises_format_error(p, "empty", fn=lambda: open_dataset(p))
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.tok").write_bytes(b"")
    raises_format_error(d / "x.tok", fn=lambda: open_dataset(d))
    raises_format_error(d / "x.tok", fn=lambda: TokenLoader(d, 4, 1, rank=0, world_size=1))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "README.md").write_text("hi")
    with pytest.raises(ValueError):
        open_dataset(empty_dir)


def _ember_fixture(tmp_path, name="s.tok"):
    docs = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9]]
    p = write_ember(tmp_path / name, docs)
    return p, docs


def test_ember_truncated_at_every_interesting_point(tmp_path):
    p, _ = _ember_fixture(tmp_path)
    full = p.read_bytes()
    n_tok = 9
    off = ember_offsets_offset(n_tok, 2)
    assert len(full) == off + 8 * 5
    for cut in (1, 4, 7, 8, 12, 30, 63, 64, 65, 70, off - 1, off, off + 8, len(full) - 1):
        q = tmp_path / f"cut{cut}.tok"
        q.write_bytes(full[:cut])
        msg = raises_format_error(q, fn=lambda: open_dataset(q))
        if 8 <= cut < 64:
            assert "header" in msg, msg
        elif cut >= 64:
            assert f"{cut} bytes" in msg and f"{len(full)} bytes" in msg, msg
    q = tmp_path / "longer.tok"
    q.write_bytes(full + b"\0" * 8)
    raises_format_error(q, f"{len(full) + 8} bytes", fn=lambda: open_dataset(q))


@pytest.mark.parametrize(
    "offset,data,fragments",
    [
        (0, b"X", ["not a recognised token shard"]),
        (8, struct.pack("<I", 2), ["`version`", "byte 8"]),
        (8, struct.pack("<I", 0), ["`version`", "byte 8"]),
        (12, struct.pack("<I", 3), ["`dtype`", "byte 12"]),
        (12, struct.pack("<I", 0), ["`dtype`", "byte 12"]),
        (16, struct.pack("<Q", 0), ["`vocab_size`", "byte 16"]),
        (16, struct.pack("<Q", 65537), ["`vocab_size`", "byte 16"]),
        (24, struct.pack("<Q", 5), ["bytes"]),  # num_docs: size mismatch
        (32, struct.pack("<Q", 30), ["bytes"]),  # num_tokens: size mismatch
        (32, struct.pack("<Q", 2**63), ["num_tokens"]),  # overflow
        (24, struct.pack("<Q", 2**64 - 1), []),
    ],
)
def test_ember_bad_header(tmp_path, offset, data, fragments):
    p, _ = _ember_fixture(tmp_path)
    patch(p, offset, data)
    raises_format_error(p, *fragments, fn=lambda: open_dataset(p))


@pytest.mark.parametrize(
    "entry,value,what",
    [
        (0, 1, "first offset"),
        (1, 6, "less than the previous"),  # 0, 6, 5: entry 2 goes backwards
        (2, 1, "less than the previous"),
        (3, 100, "past the end"),
        (4, 8, "last offset"),
        (4, 2**64 - 1, "past the end"),
    ],
)
def test_ember_bad_offsets(tmp_path, entry, value, what):
    """Offsets array (num_docs + 1 u64 at the end of the file): 0, 3, 5, 5, 9."""
    p, _ = _ember_fixture(tmp_path)
    base = ember_offsets_offset(9, 2)
    raw = p.read_bytes()
    assert list(struct.unpack("<5Q", raw[base:])) == [0, 3, 5, 5, 9]
    patch(p, base + 8 * entry, struct.pack("<Q", value))
    offsets = list(struct.unpack("<5Q", p.read_bytes()[base:]))
    # The first entry that breaks the rules is the one reported.
    bad = next(
        i
        for i, v in enumerate(offsets)
        if (i == 0 and v != 0) or (i > 0 and v < offsets[i - 1]) or v > 9 or (i == 4 and v != 9)
    )
    raises_format_error(p, f"entry {bad}", f"byte {base + 8 * bad}", what, fn=lambda: open_dataset(p))
    # The loader reads without document boundaries, but still must not use a bad index.
    with pytest.raises(ShardFormatError) as ei:
        ld = TokenLoader(p, 2, 2, rank=0, world_size=1, position_ids=True)
        next(iter(ld))
    assert str(p) in str(ei.value)


def test_ember_bad_offsets_loader_error_type_from_worker_thread(tmp_path):
    """Index errors found while loading are ShardFormatErrors too (docs/formats.md:
    'Every problem raises ShardFormatError'), even when raised on a worker thread.
    Plain batches never read the index, so the error comes with document boundaries."""
    p, _ = _ember_fixture(tmp_path)
    base = ember_offsets_offset(9, 2)
    patch(p, base + 16, struct.pack("<Q", 1))
    assert next(iter(TokenLoader(p, 2, 2, rank=0, world_size=1)))["input_ids"].shape == (2, 2)
    ld = TokenLoader(p, 2, 2, rank=0, world_size=1, cu_seqlens=True)
    with pytest.raises(ShardFormatError) as ei:
        next(iter(ld))
    assert str(p) in str(ei.value) and "byte" in str(ei.value)


def _megatron_fixture(tmp_path, code=4):
    docs = [np.arange(4), np.arange(10, 13), np.zeros(0, np.int64), np.arange(20, 26)]
    bin_path, idx_path = write_megatron(tmp_path / "mg", docs, code)
    return bin_path, idx_path, docs


@pytest.mark.parametrize(
    "offset,data,fragments",
    [
        (0, b"X", ["not a recognised token shard"]),
        (3, b"X", ["not a recognised token shard"]),
        (8, b"\x01", ["not a recognised token shard"]),
        (9, struct.pack("<Q", 2), ["`version`", "byte 9"]),
        (9, struct.pack("<Q", 0), ["`version`", "byte 9"]),
        (17, bytes([0]), ["`dtype`", "byte 17", "unknown dtype code 0"]),
        (17, bytes([9]), ["`dtype`", "byte 17", "unknown dtype code 9"]),
        (17, bytes([255]), ["`dtype`", "byte 17", "unknown dtype code 255"]),
        (18, struct.pack("<Q", 5), ["bytes"]),  # sequence_count: .idx size mismatch
        (26, struct.pack("<Q", 9), ["bytes"]),  # document_count: .idx size mismatch
        (18, struct.pack("<Q", 2**62), ["sequence_count"]),  # overflow
    ],
)
def test_megatron_bad_header(tmp_path, offset, data, fragments):
    _, idx, _ = _megatron_fixture(tmp_path)
    patch(idx, offset, data)
    for p in (idx, tmp_path / "mg"):
        raises_format_error(idx, *fragments, fn=lambda: open_dataset(p))


def test_megatron_truncated_idx(tmp_path):
    _, idx, _ = _megatron_fixture(tmp_path)
    full = idx.read_bytes()
    for cut in (1, 8, 9, 17, 20, 33, 34, 40, len(full) - 1):
        idx.write_bytes(full[:cut])
        msg = raises_format_error(idx, fn=lambda: open_dataset(idx))
        if 9 <= cut < 34:
            assert "header" in msg, msg


def test_megatron_bin_size_problems(tmp_path):
    bin_path, idx, _ = _megatron_fixture(tmp_path, code=4)
    full = bin_path.read_bytes()
    # Not a whole number of int32 tokens.
    bin_path.write_bytes(full[:-1])
    raises_format_error(bin_path, fn=lambda: open_dataset(idx))
    # Whole tokens, but fewer than the lengths say: a sequence runs past the end.
    bin_path.write_bytes(full[:-4])
    raises_format_error(idx, "entry 3", fn=lambda: open_dataset(idx))
    # More tokens than the lengths add up to.
    bin_path.write_bytes(full + b"\0" * 4)
    raises_format_error(bin_path, fn=lambda: open_dataset(idx))


@pytest.mark.parametrize(
    "what,entry,value,expect_entry",
    [
        ("pointer", 1, 15, 1),  # gap (should be 16)
        ("pointer", 1, 12, 1),  # overlap
        ("pointer", 3, 0, 3),  # decreasing
        ("pointer", 0, 4, 0),  # first pointer not 0
        ("pointer", 2, -8, 2),
        ("length", 1, -1, 1),
        ("length", 3, 100, 3),  # past the end of the .bin
    ],
)
def test_megatron_bad_index(tmp_path, what, entry, value, expect_entry):
    """lengths i32 at 34 + 4i; pointers i64 at 34 + 4n + 8i (n = 4)."""
    _, idx, docs = _megatron_fixture(tmp_path)
    n = len(docs)
    if what == "pointer":
        at = 34 + 4 * n + 8 * entry
        patch(idx, at, struct.pack("<q", value))
        fragments = [f"entry {expect_entry}", f"byte {at}"]
    else:
        at = 34 + 4 * entry
        patch(idx, at, struct.pack("<i", value))
        fragments = [f"entry {expect_entry}", f"byte {at}"]
    raises_format_error(idx, *fragments, fn=lambda: open_dataset(tmp_path / "mg"))


def test_llmc_bad_files(tmp_path):
    p = write_llmc(tmp_path / "l.bin", [50256, 1, 2, 3], LLMC_V1)
    full = p.read_bytes()
    for cut in (2, 4, 100, 1023, 1024, 1025, len(full) - 1):
        p.write_bytes(full[:cut])
        msg = raises_format_error(p, fn=lambda: open_dataset(p))
        if 4 <= cut < 1024:
            assert "header" in msg, msg
    p.write_bytes(full)
    patch(p, 4, struct.pack("<i", 7))  # v1 magic with version 7
    raises_format_error(p, "`version`", "byte 4", fn=lambda: open_dataset(p))
    p.write_bytes(full)
    patch(p, 8, struct.pack("<i", -3))
    raises_format_error(p, "`num_tokens`", "byte 8", fn=lambda: open_dataset(p))
    for count in (3, 5, 2**31 - 1):
        p.write_bytes(full)
        patch(p, 8, struct.pack("<i", count))
        raises_format_error(p, "bytes", fn=lambda: open_dataset(p))
    q = write_llmc(tmp_path / "l7.bin", [128000, 1], LLMC_V7)
    patch(q, 4, struct.pack("<i", 1))  # v7 magic with version 1
    raises_format_error(q, "`version`", fn=lambda: open_dataset(q))
    # uint32 tokens with a uint16 header: the size no longer matches.
    r = write_llmc(tmp_path / "mix.bin", [50256, 1, 2], LLMC_V7)
    patch(r, 0, struct.pack("<ii", 20240520, 1))
    raises_format_error(r, "bytes", fn=lambda: open_dataset(r))


@settings(max_examples=150, **SETTINGS)
@given(
    prefix=st.sampled_from([b"", b"EMBERTOK", b"MMIDIDX\x00\x00", struct.pack("<i", 20240520), struct.pack("<i", 20240801)]),
    body=st.binary(max_size=1200),
    name=st.sampled_from(["r.tok", "r.bin", "r.idx", "r"]),
)
def test_random_bytes_never_crash(tmp_path_factory, prefix, body, name):
    d = tmp_path_factory.mktemp("rnd")
    p = d / name
    p.write_bytes(prefix + body)
    if name == "r.idx":
        (d / "r.bin").write_bytes(body[: len(body) // 2])
    try:
        open_all(p)
    except ShardFormatError as e:
        assert str(p) in str(e) or str(d / "r.bin") in str(e) or str(d / "r.idx") in str(e), str(e)
    except FileNotFoundError as e:
        pytest.fail(f"an existing file reported as missing: {e}")


@st.composite
def valid_then_mutated(draw):
    fmt = draw(st.sampled_from(["ember", "megatron", "llmc"]))
    docs = draw(st.lists(st.lists(st.integers(0, 999), max_size=8), max_size=5))
    n_flips = draw(st.integers(1, 4))
    flips = [(draw(st.integers(0, 10**6)), draw(st.integers(1, 255))) for _ in range(n_flips)]
    cut = draw(st.one_of(st.none(), st.integers(0, 10**6)))
    return fmt, docs, flips, cut


@settings(max_examples=150, **SETTINGS)
@given(case=valid_then_mutated())
def test_mutated_valid_files_open_cleanly_or_raise(tmp_path_factory, case):
    """Byte flips and truncations of valid shards: either a clean ShardFormatError
    naming the file, or a dataset whose every document and batch can be read."""
    fmt, docs, flips, cut = case
    d = tmp_path_factory.mktemp("mut")
    if fmt == "ember":
        target = write_ember(d / "s.tok", docs)
        path = target
    elif fmt == "megatron":
        _, target = write_megatron(d / "s", [np.array(x, np.int64) for x in docs], 8)
        path = d / "s"
    else:
        target = write_llmc(d / "s.bin", [50256] + [t for x in docs for t in x], LLMC_V1)
        path = target
    raw = bytearray(target.read_bytes())
    for pos, x in flips:
        raw[pos % len(raw)] ^= x
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    target.write_bytes(bytes(raw))
    try:
        ds = open_all(path)
    except ShardFormatError as e:
        assert str(target) in str(e) or str(d / "s.bin") in str(e), str(e)
        return
    except FileNotFoundError:
        pytest.fail("an existing file reported as missing")
    if ds.num_tokens >= 3:
        for b in TokenLoader(path, 2, 1, rank=0, world_size=1, shuffle=False, position_ids=True, cu_seqlens=True):
            assert b["input_ids"].shape == (1, 2)


# -- token range check ----------------------------------------------------------------------------


def test_check_tokens_names_the_position(tmp_path):
    p = write_ember(tmp_path / "v.tok", [[1, 2, 3], [4, 999, 5]], vocab=1000)
    open_dataset(p, check_tokens=True)  # the shard's own vocabulary: fine
    open_dataset(p, check_tokens=True, vocab_size=1000)
    msg = raises_format_error(p, "999", "position 4", f"byte {64 + 2 * 4}", fn=lambda: open_dataset(p, check_tokens=True, vocab_size=999))
    assert "999" in msg
    raises_format_error(p, "4", "position 3", fn=lambda: open_dataset(p, check_tokens=True, vocab_size=4))
    open_dataset(p, check_tokens=False, vocab_size=4)  # no check asked

    _, idx = write_megatron(tmp_path / "neg", [np.array([3, 4]), np.array([5, -2, 1])], 2)
    raises_format_error(tmp_path / "neg.bin", "-2", "position 3", f"byte 3", fn=lambda: open_dataset(idx, check_tokens=True, vocab_size=10))
    with pytest.raises(ValueError):  # Megatron records no vocabulary size
        open_dataset(idx, check_tokens=True)

    lc = write_llmc(tmp_path / "c.bin", [128000, 5, 128256, 1], LLMC_V7)
    raises_format_error(lc, "128256", "position 2", f"byte {1024 + 8}", fn=lambda: open_dataset(lc, check_tokens=True, vocab_size=128256))
    open_dataset(lc, check_tokens=True, vocab_size=128257)

    d = tmp_path / "dir"
    d.mkdir()
    write_ember(d / "a.tok", [[1, 2]], vocab=10)
    write_ember(d / "b.tok", [[3, 9, 4]], vocab=10)
    raises_format_error(d / "b.tok", "position 1", fn=lambda: open_dataset(d, check_tokens=True, vocab_size=9))


def test_writer_dtype_and_discard(tmp_path):
    assert open_dataset(write_ember(tmp_path / "a.tok", [[65535]], 65536)).dtype == np.uint16
    assert open_dataset(write_ember(tmp_path / "b.tok", [[65536]], 65537)).dtype == np.uint32
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "c.tok", 100) as w:
            w.add_document([1, 2])
            raise RuntimeError("boom")
    assert not (tmp_path / "c.tok").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path / "d.tok", 100) as w:
            w.add_document([1, 100])
    assert not (tmp_path / "d.tok").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
