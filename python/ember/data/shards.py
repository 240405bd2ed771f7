"""Writing and reading token shards (formats are described in docs/formats.md)."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ember import _native

PathLike = str | os.PathLike


class ShardWriter:
    """Writes documents of token ids into one Ember shard at ``path``.

    Tokens are stored as uint16 when ``vocab_size <= 65536``, else uint32. The
    shard appears under ``path`` only when :meth:`close` succeeds; leaving a
    ``with`` block by an exception discards it, so a failed run never leaves a
    partial shard behind.
    """

    def __init__(self, path: PathLike, vocab_size: int):
        self.path = Path(path)
        self._writer = _native.ShardWriter(os.fspath(self.path), int(vocab_size))

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.path}: a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"{self.path}: token ids must be integers, got dtype {arr.dtype}")
        self._writer.add_document_bytes(arr.astype("<i8", copy=False).tobytes())

    def close(self) -> Path:
        """Finishes the shard and returns its path."""
        return Path(self._writer.finish())

    def abort(self) -> None:
        """Discards everything written; ``path`` is left untouched."""
        self._writer.abort()

    @property
    def num_docs(self) -> int:
        return self._writer.num_docs

    @property
    def num_tokens(self) -> int:
        return self._writer.num_tokens

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._writer.dtype)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenDataset(Sequence):
    """Documents of a token dataset; ``ds[i]`` is a read-only NumPy view into the
    memory-mapped file, with no copy. Returned by :func:`open_dataset`."""

    _MAX_MAPPED = 64

    def __init__(self, native: _native.Dataset, name: str):
        self._native = native
        self.name = name
        self._len: int | None = None
        self._maps: OrderedDict[str, np.memmap] = OrderedDict()
        shards = native.shards()
        self.shards = [s.path for s in shards]
        formats = {s.format for s in shards}
        self.format = formats.pop() if len(formats) == 1 else "mixed"
        self.dtype = np.result_type(*{np.dtype(s.dtype) for s in shards})
        vocabs = {s.vocab_size for s in shards}
        self.vocab_size: int | None = vocabs.pop() if len(vocabs) == 1 else None

    @property
    def num_tokens(self) -> int:
        return self._native.num_tokens

    def __len__(self) -> int:
        if self._len is None:
            self._len = self._native.num_docs()
        return self._len

    def _map(self, path: str) -> np.memmap:
        m = self._maps.get(path)
        if m is None:
            m = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps[path] = m
            if len(self._maps) > self._MAX_MAPPED:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(path)
        return m

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"documents are indexed by int, got {type(i).__name__}")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: document index {i} is out of range for {n} documents")
        loc = self._native.doc_location(int(i))
        dt = np.dtype(loc.dtype)
        if loc.length == 0:  # also covers token files too empty to map
            empty = np.empty(0, dtype=dt)
            empty.flags.writeable = False
            return empty
        raw = self._map(loc.path)[loc.offset : loc.offset + loc.length * dt.itemsize]
        return raw.view(dtype=dt, type=np.ndarray)

    def validate(self, *, check_tokens: bool = True, vocab_size: int | None = None) -> None:
        """Checks every shard's index and, by default, every token id against the vocabulary."""
        self._native.validate(check_tokens, vocab_size)

    def __repr__(self) -> str:
        return (
            f"TokenDataset({self.name!r}, format={self.format}, shards={len(self.shards)}, "
            f"tokens={self.num_tokens}, dtype={self.dtype})"
        )


def open_dataset(
    path: PathLike | Sequence[PathLike],
    *,
    check_tokens: bool = False,
    vocab_size: int | None = None,
    llmc_delimiter: int | None = None,
    max_open_shards: int = 4096,
) -> TokenDataset:
    """Opens token shards, detecting the format from the file contents.

    ``path`` is an Ember shard, a Megatron ``.bin``, ``.idx`` or common prefix,
    an llm.c ``.bin`` shard, a directory of any of these, or a list of them
    (read one after another). Headers and document indices are validated now;
    ``check_tokens=True`` also checks every token id against ``vocab_size`` (or
    the vocabulary size the shards record). Problems raise
    :class:`ember.data.ShardFormatError` naming the file and offset.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    native = _native.Dataset([os.fspath(p) for p in paths], llmc_delimiter=llmc_delimiter, max_open_shards=max_open_shards)
    native.validate(check_tokens, vocab_size)
    return TokenDataset(native, ", ".join(os.fspath(p) for p in paths))


def check_vocabulary(paths: PathLike | Sequence[PathLike] | Mapping[PathLike, float], vocab_size: int, key: str) -> None:
    """Raises ``ValueError`` when a shard records a tokenizer vocabulary larger than
    ``vocab_size`` (the model's embedding table), naming the shard and the config ``key``
    that listed it. ``paths`` is a path, a list of paths or a ``{path: weight}`` blend,
    as ``TokenLoader`` takes them."""
    names = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for name in names:
        for shard in _native.Dataset([os.fspath(name)]).shards():
            if shard.vocab_size is not None and shard.vocab_size > vocab_size:
                raise ValueError(
                    f"{shard.path}: tokenized with a vocabulary of {shard.vocab_size}, larger than the model's "
                    f"vocab_size {vocab_size} ({key}); set model.vocab_size or use shards of a matching tokenizer"
                )
