"""Reading corpora for ``ember prepare``: which files an input names, and the documents in each.

An input is a file, a directory (searched recursively), a glob, or ``builtin:stdlib``.
Files are ``.txt``, ``.jsonl`` or ``.parquet``, each possibly compressed (``.gz``,
``.zst``). Files are read in a fixed order, so documents get the same ordinals on
every run. A problem in the data raises :class:`PrepareError` naming the file and the
line (or row); with ``skip_bad`` such records are skipped and counted instead.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from ember.data.corpus import stdlib_files

STDLIB = "builtin:stdlib"
KINDS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TxtMode = Literal["file", "line", "paragraph"]
TXT_MODES = ("file", "line", "paragraph")


class PrepareError(ValueError):
    """A problem with what ``ember prepare`` was asked to do: the message says where and what to do."""


# Optional packages: what to install for each (zstandard is a dependency of Ember; pyarrow is the `parquet` extra).
_INSTALL = {"pyarrow": "pip install pyarrow (or pip install 'ember-llm[parquet]')", "zstandard": "pip install zstandard"}


def missing_dependency(module: str, purpose: str) -> PrepareError:
    return PrepareError(f"{purpose} needs the `{module}` package: {_INSTALL[module]}")


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"  # the JSON key / Parquet column holding each document's text
    txt_mode: TxtMode = "file"  # .txt documents: a whole file, each line, or blank-line-separated paragraphs
    skip_bad: bool = False  # skip (and count) malformed records instead of stopping


@dataclass(frozen=True)
class SourceFile:
    """One file to read. ``name`` is how the manifest and error messages show it."""

    path: Path
    name: str
    kind: Literal["txt", "jsonl", "parquet"]
    compression: Literal["gzip", "zstd"] | None
    size: int
    mtime_ns: int
    builtin: bool = False  # a file of a built-in corpus: one document per file, undecodable files skipped

    def identity(self) -> list:
        """What must be unchanged for an interrupted run to resume."""
        return [self.name, self.size, self.mtime_ns]


@dataclass
class FileStats:
    """Counts for one input file, recorded in the manifest."""

    documents: int = 0  # documents read (each gets an ordinal)
    text_bytes: int = 0  # UTF-8 bytes of those documents
    empty: int = 0  # records whose text is empty or only whitespace: skipped
    bad: int = 0  # malformed records skipped under skip_bad
    first_bad: str | None = None  # the first of them, for the report

    def to_dict(self) -> dict:
        d = {"documents": self.documents, "text_bytes": self.text_bytes, "skipped_empty": self.empty, "skipped_bad": self.bad}
        if self.first_bad is not None:
            d["first_bad"] = self.first_bad
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FileStats:
        return cls(d["documents"], d["text_bytes"], d["skipped_empty"], d["skipped_bad"], d.get("first_bad"))


# -- which files ----------------------------------------------------------------


def _kind_of(path: Path) -> tuple[str, str | None] | None:
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    kind = KINDS.get(suffixes[-1]) if suffixes else None
    return (kind, compression) if kind else None


def _source(path: Path, name: str, kind: str, compression: str | None, builtin: bool = False) -> SourceFile:
    st = path.stat()
    return SourceFile(path, name, kind, compression, st.st_size, st.st_mtime_ns, builtin)  # type: ignore[arg-type]


def _stdlib_sources() -> list[SourceFile]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [_source(p, f"{STDLIB}/{p.relative_to(root).as_posix()}", "txt", None, builtin=True) for p in stdlib_files()]


def expand_inputs(specs: list[str]) -> list[SourceFile]:
    """The files that ``specs`` name, in reading order: each spec's files sorted by path,
    specs in the order given, a file named twice read once."""
    if not specs:
        raise PrepareError("no inputs given: name files, directories, globs or builtin:stdlib")
    supported = ", ".join(sorted(KINDS)) + " (optionally + " + ", ".join(sorted(COMPRESSIONS)) + ")"
    out: list[SourceFile] = []
    seen: set[Path] = set()

    def add(src: SourceFile) -> None:
        key = src.path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(src)

    for spec in specs:
        spec = os.fspath(spec)
        if spec == STDLIB:
            for src in _stdlib_sources():
                add(src)
            continue
        if spec.startswith("builtin:"):
            raise PrepareError(f"input {spec!r}: unknown built-in corpus; the built-in corpus is {STDLIB}")
        path = Path(spec)
        if glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [(m, k) for m in matches if m.is_file() and (k := _kind_of(m))]
            if not files:
                raise PrepareError(f"input {spec!r}: the glob matches no {supported} files")
        elif path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                key=lambda p: p.as_posix(),
            )
            files = [(p, k) for p in found if (k := _kind_of(p))]
            if not files:
                raise PrepareError(f"input {spec!r}: the directory holds no {supported} files")
        elif path.is_file():
            kind = _kind_of(path)
            if kind is None:
                raise PrepareError(f"input {spec!r}: unsupported file type; ember prepare reads {supported}")
            files = [(path, kind)]
        else:
            raise PrepareError(f"input {spec!r}: no such file or directory")
        for p, (kind, compression) in files:
            add(_source(p, p.as_posix(), kind, compression))
    return out


# -- documents in one file --------------------------------------------------------


# The EOFError Python's gzip module raises for a file that ends inside a member; a .zst
# file that ends inside a frame raises the same, and both are reported alike.
TRUNCATED = "Compressed file ended before the end-of-stream marker was reached"


class _ZstdFrames:
    """The compressed bytes of a .zst file on their way to the decompressor, followed frame by
    frame so that a file that ends inside a frame raises ``EOFError``. zstandard's stream
    reader returns what it has decoded when its input ends, complete frame or not, so a
    truncated file would otherwise read as a shorter one. Only the headers are parsed (the
    frame and block headers of RFC 8878, section 3.1), to know where each frame ends; bytes
    that are not zstd are passed on for the decompressor to refuse."""

    _MAGIC = 0xFD2FB528
    _SKIPPABLE = 0x184D2A50  # the 16 magic numbers of skippable frames, low 4 bits cleared

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._offset = 0  # bytes passed on
        self._next = 0  # where the next header starts
        self._header = bytearray()
        self._want = 4  # header bytes needed, and which header they make:
        self._expect = "magic"  # "magic", "skippable size", "descriptor", "rest" (of the frame header) or "block"
        self._checksum = 0  # bytes of content checksum after the frame's last block
        self._following = True  # False once the bytes are not zstd

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self._follow(data)
        elif self._following and (self._expect != "magic" or self._header or self._next > self._offset):
            raise EOFError(TRUNCATED)
        return data

    def _follow(self, data: bytes) -> None:
        end = self._offset + len(data)
        while self._following and self._next < end:
            i = self._next - self._offset
            part = data[i : i + self._want - len(self._header)]
            self._header += part
            self._next += len(part)
            if len(self._header) == self._want:
                self._on_header(bytes(self._header))
                self._header.clear()
        self._offset = end

    def _on_header(self, h: bytes) -> None:
        value = int.from_bytes(h, "little")
        if self._expect == "magic":
            if value == self._MAGIC:
                self._expect, self._want = "descriptor", 1
            elif value & ~0xF == self._SKIPPABLE:
                self._expect, self._want = "skippable size", 4
            else:
                self._following = False
        elif self._expect == "skippable size":
            self._next += value
            self._expect, self._want = "magic", 4
        elif self._expect == "descriptor":
            content_size, single_segment, dictionary_id = value >> 6, value >> 5 & 1, value & 3
            self._checksum = 4 if value >> 2 & 1 else 0
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[dictionary_id] + (single_segment, 2, 4, 8)[content_size]
            self._expect, self._want = ("rest", rest) if rest else ("block", 3)
        elif self._expect == "rest":
            self._expect, self._want = "block", 3
        else:  # a block header: last-block bit, type (raw, RLE, compressed), size
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            self._next += 1 if kind == 1 else size  # an RLE block holds one byte, repeated size times
            if last:
                self._next += self._checksum
                self._expect, self._want = "magic", 4


def _open_binary(src: SourceFile, raw: BinaryIO) -> BinaryIO:
    if src.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if src.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise missing_dependency("zstandard", f"{src.name}: reading .zst files") from None
        reader = zstandard.ZstdDecompressor().stream_reader(_ZstdFrames(raw), read_across_frames=True)
        return io.BufferedReader(reader, 1 << 20)  # type: ignore[arg-type]
    return raw


JSONL_CHUNK_BYTES = 1 << 20  # lines handed to the native parser at a time


class FileReader:
    """Iterates ``(line, text, utf8_bytes)`` for the documents of one file; ``line`` is
    1-based (for Parquet, the row). Counts go to ``stats``; ``raw_position`` is how far
    into the file on disk reading has got, for progress."""

    def __init__(self, src: SourceFile, options: ReadOptions, stats: FileStats):
        self.src = src
        self.options = options
        self.stats = stats
        self._raw: BinaryIO | None = None
        self._parquet_done = 0.0
        self._done = False

    @property
    def raw_position(self) -> int:
        if self._done:
            return self.src.size
        if self.src.kind == "parquet":
            return int(self._parquet_done * self.src.size)
        if self._raw is None or self._raw.closed:
            return 0
        return self._raw.tell()

    def _bad(self, line: int, problem: str) -> None:
        where = f"{self.src.name}:{line}: {problem}"
        if not (self.options.skip_bad or self.src.builtin):
            raise PrepareError(f"{where} (pass --skip-bad, or skip_bad: true, to skip such records and count them)")
        self.stats.bad += 1
        if self.stats.first_bad is None:
            self.stats.first_bad = where

    def __iter__(self) -> Iterator[tuple[int, str, int]]:
        try:
            if self.src.kind == "parquet":
                yield from self._parquet()
            else:
                yield from self._text_records()
        except _read_errors() as e:
            if isinstance(e, FileNotFoundError):
                raise PrepareError(f"{self.src.name}: the file disappeared while preparing") from None
            what = f"{self.src.name}: cannot read it ({self.src.compression or 'plain'} file)"
            if isinstance(e, EOFError):
                raise PrepareError(
                    f"{what}: it ends at byte {self.src.size} in the middle of compressed data: "
                    "the file is truncated (copy or download it again)"
                ) from None
            raise PrepareError(f"{what}: {e}") from None
        self._done = True
        if self.stats.documents == 0 and not self.src.builtin:
            self._empty_file()

    def _text_records(self) -> Iterator[tuple[int, str, int]]:
        with open(self.src.path, "rb") as raw:
                self._raw = raw
                with _open_binary(self.src, raw) as f:
                    if self.src.kind == "jsonl":
                        yield from self._jsonl(f)
                    elif self.src.builtin or self.options.txt_mode == "file":
                        yield from self._txt_file(f)
                    elif self.options.txt_mode == "line":
                        yield from self._txt_lines(f)
                    else:
                        yield from self._txt_paragraphs(f)

    def _empty_file(self) -> None:
        s = self.stats
        if s.bad:
            detail = f"all of its records were skipped ({s.bad} bad, {s.empty} empty)"
        elif s.empty and not (self.src.kind == "txt" and self.options.txt_mode == "file"):
            detail = f"all of its {s.empty} records are empty"
        else:
            detail = "the file is empty"
        if not self.options.skip_bad:
            raise PrepareError(f"{self.src.name}: no documents: {detail} (pass --skip-bad, or skip_bad: true, to allow it)")

    def _decode(self, data: bytes, line: int) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            at = line + data.count(b"\n", 0, e.start)
            self._bad(at, f"bytes that are not UTF-8 ({e.reason} at byte {e.start} of the record: {data[e.start:e.start + 4]!r})")
            return None

    def _document(self, line: int, text: str, nbytes: int) -> tuple[int, str, int] | None:
        if not text.strip():
            self.stats.empty += 1
            return None
        self.stats.documents += 1
        self.stats.text_bytes += nbytes
        return line, text, nbytes

    def _txt_file(self, f: BinaryIO) -> Iterator[tuple[int, str, int]]:
        data = f.read()
        text = self._decode(data, 1)
        if text is not None and (doc := self._document(1, text, len(data))):
            yield doc

    def _txt_lines(self, f: BinaryIO) -> Iterator[tuple[int, str, int]]:
        for n, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            text = self._decode(raw, n)
            if text is not None and (doc := self._document(n, text, len(raw))):
                yield doc

    def _txt_paragraphs(self, f: BinaryIO) -> Iterator[tuple[int, str, int]]:
        lines: list[bytes] = []
        start = 0
        for n, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                if not lines:
                    start = n
                lines.append(raw)
                continue
            if lines:
                yield from self._paragraph(start, lines)
                lines = []
        if lines:
            yield from self._paragraph(start, lines)

    def _paragraph(self, start: int, lines: list[bytes]) -> Iterator[tuple[int, str, int]]:
        data = b"\n".join(lines)
        text = self._decode(data, start)
        if text is not None and (doc := self._document(start, text, len(data))):
            yield doc

    def _jsonl(self, f: BinaryIO) -> Iterator[tuple[int, str, int]]:
        # Chunks of lines go through Rust's JSON parser (well-formed records only, the
        # GIL released); every line it declines is read by Python's, as before, so the
        # texts and the messages are the same either way.
        from ember._native import jsonl_texts

        key = self.options.text_field
        n = 0
        while lines := f.readlines(JSONL_CHUNK_BYTES):
            texts, lengths = jsonl_texts(lines, key)
            for raw, text, nbytes in zip(lines, texts, lengths):
                n += 1
                if text is None:
                    doc = self._jsonl_record(n, raw)
                else:
                    doc = self._document(n, text, nbytes)
                if doc:
                    yield doc

    def _jsonl_record(self, n: int, raw: bytes) -> tuple[int, str, int] | None:
        """One JSON Lines record through Python's parser: the document, or None (blank
        line, empty or bad record)."""
        key = self.options.text_field
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as e:
            self._bad(n, f"bytes that are not UTF-8 ({e.reason} at byte {e.start} of the line)")
            return None
        except ValueError as e:
            self._bad(n, f"malformed JSON ({e})")
            return None
        if not isinstance(record, dict):
            self._bad(n, f"expected a JSON object, got {type(record).__name__}")
            return None
        if key not in record:
            fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            raise PrepareError(
                f"{self.src.name}:{n}: no field {key!r} in the record (its fields: {fields}); "
                "set the text field with --text-field (text_field in YAML)"
            )
        text = record[key]
        if not isinstance(text, str):
            self._bad(n, f"field {key!r} is {_json_type(text)}, not a string")
            return None
        try:
            nbytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            self._bad(n, f"field {key!r} holds an unpaired surrogate escape at character {e.start}, which is not valid Unicode")
            return None
        return self._document(n, text, nbytes)

    def _parquet(self) -> Iterator[tuple[int, str, int]]:
        try:
            import pyarrow.compute as pc
            import pyarrow.parquet as pq
        except ImportError:
            raise missing_dependency("pyarrow", f"{self.src.name}: reading .parquet files") from None
        key = self.options.text_field
        if self.src.compression:
            with open(self.src.path, "rb") as raw, _open_binary(self.src, raw) as f:
                source: object = io.BytesIO(f.read())
        else:
            source = self.src.path
        try:
            pf = pq.ParquetFile(source)
        except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
            raise PrepareError(f"{self.src.name}: not a readable Parquet file: {e}") from None
        names = pf.schema_arrow.names
        if key not in names:
            raise PrepareError(
                f"{self.src.name}: no column {key!r} (its columns: {', '.join(map(repr, names))}); "
                "set the text column with --text-field (text_field in YAML)"
            )
        total = max(pf.metadata.num_rows, 1)
        row = 0
        for batch in pf.iter_batches(columns=[key], batch_size=4096):
            column = batch.column(0)
            if not (column.type.equals("string") or column.type.equals("large_string")):
                raise PrepareError(f"{self.src.name}: column {key!r} holds {column.type}, not text")
            lengths = pc.binary_length(column).to_pylist()
            for text, nbytes in zip(column.to_pylist(), lengths):
                row += 1
                if text is None:
                    self._bad(row, f"column {key!r} is null in row {row}")
                elif doc := self._document(row, text, nbytes):
                    yield doc
            self._parquet_done = row / total


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or truncated (compressed) file raises."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


def read_documents(src: SourceFile, options: ReadOptions, stats: FileStats | None = None) -> Iterator[tuple[int, str, int]]:
    """``(line, text, utf8_bytes)`` for each document of ``src``; see :class:`FileReader`."""
    return iter(FileReader(src, options, stats if stats is not None else FileStats()))
