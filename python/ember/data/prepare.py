"""``ember prepare``: tokenize text corpora into Ember token shards.

The pipeline, in one process::

    main thread: read files in order -> documents get ordinals -> split -> batches
    worker threads: tokenizer.encode_batch(batch)        (GIL released, one core each)
    main thread: results in batch order -> ShardWriter per split -> progress.json

The output depends only on the inputs, the tokenizer and the options: documents are
numbered in reading order, the train/validation split is a function of that number,
and results are written in order, so any number of workers gives the same bytes.
A run records every finished shard in ``progress.json`` (written atomically); a
run started again on the same output, inputs and options picks up after the last
recorded shard and writes what the uninterrupted run would have. See docs/prepare.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ember.data.encoders import DocumentEncoder, load_encoder, single_threaded
from ember.data.readers import (
    TXT_MODES,
    FileReader,
    FileStats,
    PrepareError,
    ReadOptions,
    SourceFile,
    expand_inputs,
)
from ember.data.shards import ShardWriter, open_dataset

__all__ = ["PrepareError", "ensure_prepared", "prepare"]

DEFAULT_SHARD_TOKENS = 100_000_000
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOCK = ".lock"
SPLITS = ("train", "validation")
FORMAT = "ember-prepare"
VERSION = 1
BATCH_BYTES = 1 << 20  # text per tokenizer call: large enough to amortise the call, small enough to spread evenly
BATCH_DOCS = 8192


# -- options ----------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides the output's bytes (``workers`` and the progress bar do not)."""

    tokenizer: str = "byte"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    validation_fraction: float = 0.0
    validation_count: int = 0
    bos: bool | None = None  # None: as the tokenizer defines
    eos: bool | None = None
    text_field: str = "text"
    txt_mode: str = "file"
    skip_bad: bool = False

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.text_field, self.txt_mode, self.skip_bad)  # type: ignore[arg-type]


def option_problems(
    *,
    shard_tokens: int,
    validation_fraction: float | None,
    validation_count: int | None,
    txt_mode: str,
    text_field: str,
    workers: int | None,
) -> list[tuple[str, str]]:
    """Problems with prepare's options as ``(option, message)``; config validation shares it."""
    p = []
    if shard_tokens < 1:
        p.append(("shard_tokens", f"must be at least 1, got {shard_tokens}"))
    if validation_fraction is not None and not 0.0 <= validation_fraction < 1.0:
        p.append(("validation_fraction", f"must be at least 0 and below 1, got {validation_fraction}"))
    if validation_count is not None and validation_count < 0:
        p.append(("validation_count", f"must not be negative, got {validation_count}"))
    if validation_fraction and validation_count:
        p.append(("validation_count", "give validation_fraction or validation_count, not both"))
    if txt_mode not in TXT_MODES:
        p.append(("txt_mode", f"expected one of {', '.join(TXT_MODES)}, got {txt_mode!r}"))
    if not text_field:
        p.append(("text_field", "must not be empty"))
    if workers is not None and workers < 1:
        p.append(("workers", f"must be at least 1, got {workers}"))
    return p


def make_options(
    *,
    tokenizer: str | os.PathLike,
    shard_tokens: int,
    validation_fraction: float | None,
    validation_count: int | None,
    bos: bool | None,
    eos: bool | None,
    text_field: str,
    txt_mode: str,
    skip_bad: bool,
    workers: int | None = None,
) -> PrepareOptions:
    """Checks prepare's arguments (raising :class:`PrepareError` listing every problem) and normalises them."""
    problems = option_problems(
        shard_tokens=shard_tokens,
        validation_fraction=validation_fraction,
        validation_count=validation_count,
        txt_mode=txt_mode,
        text_field=text_field,
        workers=workers,
    )
    if problems:
        raise PrepareError("; ".join(f"{k}: {m}" for k, m in problems))
    return PrepareOptions(
        tokenizer=os.fspath(tokenizer),
        shard_tokens=int(shard_tokens),
        validation_fraction=float(validation_fraction or 0.0),
        validation_count=int(validation_count or 0),
        bos=bos,
        eos=eos,
        text_field=text_field,
        txt_mode=txt_mode,
        skip_bad=bool(skip_bad),
    )


class SplitRule:
    """Which split document ``ordinal`` goes to. By fraction ``f``: document ``i`` is a
    validation document when ``floor((i + 1) f) > floor(i f)``, which spreads them evenly
    (``f = 0.02``: documents 49, 99, 149, ...); by count ``n``: documents ``0 .. n-1``."""

    def __init__(self, fraction: float, count: int):
        self.count = count
        # The decimal the user wrote, exactly: 0.02 is 1/50, not the nearest binary float.
        f = Fraction(Decimal(repr(fraction))) if fraction else Fraction(0)
        self.num, self.den = f.numerator, f.denominator

    @property
    def has_validation(self) -> bool:
        return self.count > 0 or self.num > 0

    def __call__(self, ordinal: int) -> str:
        if self.count:
            return "validation" if ordinal < self.count else "train"
        if self.num and ((ordinal + 1) * self.num) // self.den > (ordinal * self.num) // self.den:
            return "validation"
        return "train"


# -- writing shards ---------------------------------------------------------------


class _SplitWriter:
    """The shards of one split: completed ones (records) and the one being written."""

    def __init__(self, root: Path, name: str, vocab_size: int, shard_tokens: int, shards: list[dict]):
        self.root, self.name = root, name
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.shards = shards
        # Every document of this split below this ordinal is in a completed shard.
        self.persisted_upto = shards[-1]["last_ordinal"] + 1 if shards else 0
        self._writer: ShardWriter | None = None
        self._last = -1

    def add(self, ordinal: int, tokens: np.ndarray) -> bool:
        """Adds one document; True when that completed a shard."""
        if self._writer is None:
            (self.root / self.name).mkdir(exist_ok=True)
            path = self.root / self.name / f"{len(self.shards):05d}.tok"
            self._writer = ShardWriter(path, self.vocab_size)
        self._writer.add_document(tokens)
        self._last = ordinal
        if self._writer.num_tokens >= self.shard_tokens:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self._writer is None:
            return
        w, self._writer = self._writer, None
        docs, tokens = w.num_docs, w.num_tokens
        path = w.close()
        self.shards.append(
            {"path": path.relative_to(self.root).as_posix(), "documents": docs, "tokens": tokens, "last_ordinal": self._last}
        )

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def summary(self) -> dict:
        return {
            "documents": sum(s["documents"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the output directory: fresh, resumed, or refused -----------------------------


def _describe_changes(old: dict, new: dict) -> list[str]:
    changes = []
    if old["inputs"] != new["inputs"]:
        changes.append(f"inputs {old['inputs']} -> {new['inputs']}")
    elif old["files"] != new["files"]:
        before = {f[0]: f for f in old["files"]}
        after = {f[0]: f for f in new["files"]}
        names = [n for n in after if n not in before][:3]
        names += [n for n in before if n not in after][:3]
        names += [n for n in after if n in before and after[n] != before[n]][:3]
        changes.append(f"input files added, removed or modified: {', '.join(names) or 'their order'}")
    if old["tokenizer"] != new["tokenizer"]:
        changes.append(f"tokenizer {old['tokenizer'].get('name')} ({old['tokenizer'].get('fingerprint')}) -> "
                       f"{new['tokenizer'].get('name')} ({new['tokenizer'].get('fingerprint')})")
    for key in new["options"]:
        if old["options"].get(key) != new["options"][key] and key != "tokenizer":
            changes.append(f"{key} {old['options'].get(key)!r} -> {new['options'][key]!r}")
    return changes


def _clear(output: Path) -> None:
    for split in SPLITS:
        shutil.rmtree(output / split, ignore_errors=True)
    for name in (PROGRESS, MANIFEST):
        (output / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """Holds ``output/.lock`` so that two runs never write the same output at once."""
    if output.exists() and not output.is_dir():
        raise PrepareError(f"output {output} exists and is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    lock = output / LOCK
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"output {output} is being written by another ember prepare run ({lock} is locked)") from None
        for name in (PROGRESS, MANIFEST):  # left by a run killed while writing them
            for tmp in output.glob(f".{name}.tmp-*"):
                tmp.unlink()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # a killed run leaves it behind, unlocked and harmless
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_progress(path: Path) -> dict:
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
        version = progress["version"]
        progress["plan"], progress["splits"], progress["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"{path}: unreadable progress record ({e!r}); pass --overwrite to start over") from None
    if version != VERSION:
        raise PrepareError(f"{path} was written by another version of ember prepare; pass --overwrite to start over")
    return progress


def _open_output(output: Path, plan: dict, overwrite: bool) -> dict | None:
    """Returns the progress record to resume from, or None to start afresh (with ``output``
    ready for it). Refuses a finished output unless ``overwrite``, and an interrupted
    one whose inputs or options differ from ``plan``."""
    ours = [n for n in (MANIFEST, PROGRESS, *SPLITS) if (output / n).exists()]
    if (output / MANIFEST).exists():
        if not overwrite:
            raise PrepareError(
                f"output {output} already holds a finished preparation ({output / MANIFEST}); "
                "pass --overwrite (overwrite=True) to replace it, or choose another output"
            )
        _clear(output)
    elif (output / PROGRESS).exists():
        if overwrite:
            _clear(output)
        else:
            progress = _read_progress(output / PROGRESS)
            if not any(progress["splits"].get(s) for s in SPLITS):
                _clear(output)  # nothing was finished: start afresh, whatever changed
            elif progress["plan"] != plan:
                changes = _describe_changes(progress["plan"], plan)
                raise PrepareError(
                    f"output {output} holds an interrupted preparation of different inputs or options "
                    f"({'; '.join(changes) or 'format changed'}); run again with the same ones to resume it, "
                    "or pass --overwrite to discard it"
                )
            else:
                return progress
    elif ours:
        raise PrepareError(
            f"output {output} already has {', '.join(ours)} but no {MANIFEST} or {PROGRESS}: it was not written by "
            "ember prepare; remove it or choose another output"
        )
    return None


def _remove_unrecorded(output: Path, progress: dict) -> None:
    """Deletes what a killed run left beyond its last recorded shard: temporary files of
    unfinished shards, and shards finished but not yet recorded (they are rewritten)."""
    for split in SPLITS:
        d = output / split
        if not d.is_dir():
            continue
        keep = {s["path"] for s in progress["splits"].get(split, [])}
        for p in d.iterdir():
            if f"{split}/{p.name}" not in keep:
                p.unlink()


# -- reading into batches -----------------------------------------------------------


@dataclass
class _Batch:
    ordinals: list[int] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text_bytes: int = 0
    file_ends: list[tuple[int, int]] = field(default_factory=list)  # (documents of this batch before it, file index)
    raw_bytes: int = 0  # input bytes on disk read since the previous batch
    documents: int = 0  # documents read, including those skipped because a resumed run already wrote them


def _batches(
    files: list[SourceFile],
    start_file: int,
    ordinal: int,
    rule: SplitRule,
    persisted_upto: dict[str, int],
    options: ReadOptions,
    stats: list[FileStats | None],
) -> Iterator[_Batch]:
    batch = _Batch()
    raw_before = sum(f.size for f in files[:start_file])  # bytes on disk of the files already finished
    raw_reported = raw_before
    for fi in range(start_file, len(files)):
        stats[fi] = st = FileStats()
        reader = FileReader(files[fi], options, st)
        for _line, text, nbytes in reader:
            split = rule(ordinal)
            batch.documents += 1
            if ordinal >= persisted_upto[split]:
                batch.ordinals.append(ordinal)
                batch.splits.append(split)
                batch.texts.append(text)
                batch.text_bytes += nbytes
            ordinal += 1
            if batch.text_bytes >= BATCH_BYTES or len(batch.texts) >= BATCH_DOCS:
                position = raw_before + reader.raw_position
                batch.raw_bytes, raw_reported = position - raw_reported, position
                yield batch
                batch = _Batch()
        raw_before += files[fi].size
        batch.file_ends.append((len(batch.texts), fi))
    batch.raw_bytes = raw_before - raw_reported
    yield batch


# -- the run ----------------------------------------------------------------------


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Run:
    """One preparation into ``output``: state shared by the reading and writing sides."""

    def __init__(self, output: Path, plan: dict, files: list[SourceFile], encoder: DocumentEncoder,
                 options: PrepareOptions, progress: dict | None):
        self.output, self.plan, self.files = output, plan, files
        self.encoder, self.options = encoder, options
        self.rule = SplitRule(options.validation_fraction, options.validation_count)
        recorded = progress["splits"] if progress else {}
        self.splits = {
            s: _SplitWriter(output, s, encoder.vocab_size, options.shard_tokens, list(recorded.get(s, [])))
            for s in SPLITS
        }
        self.stats: list[FileStats | None] = [None] * len(files)
        self.files_done = 0  # files whose every document has reached the writers
        self.start_file, self.start_ordinal = 0, 0
        if progress:
            self._resume_point([FileStats.from_dict(d) for d in progress["files"]])

    def _resume_point(self, done: list[FileStats]) -> None:
        """Reading restarts at the last file that begins at or before the first document
        not in a completed shard; documents already in completed shards are skipped."""
        active = [w for s, w in self.splits.items() if s == "train" or self.rule.has_validation]
        first_unsaved = min(w.persisted_upto for w in active)
        start, ordinal = 0, 0
        for i, st in enumerate(done):
            if ordinal + st.documents > first_unsaved:
                break
            start, ordinal = i + 1, ordinal + st.documents
        self.start_file, self.start_ordinal = start, ordinal
        self.stats[:start] = done[:start]
        self.files_done = start

    def save_progress(self) -> None:
        record = {
            "version": VERSION,
            "plan": self.plan,
            "splits": {s: w.shards for s, w in self.splits.items()},
            "files": [st.to_dict() for st in self.stats[: self.files_done]],  # type: ignore[union-attr]
        }
        _write_json_atomic(self.output / PROGRESS, record)

    def write(self, batch: _Batch, result: tuple[np.ndarray, np.ndarray] | None) -> None:
        ends = deque(batch.file_ends)
        if result is not None:
            tokens, lengths = result
            offsets = np.concatenate(([0], np.cumsum(lengths))).tolist()
            for j, (ordinal, split) in enumerate(zip(batch.ordinals, batch.splits)):
                while ends and ends[0][0] <= j:
                    self.files_done = ends.popleft()[1] + 1
                if self.splits[split].add(ordinal, tokens[offsets[j] : offsets[j + 1]]):
                    self.save_progress()
        while ends:
            self.files_done = ends.popleft()[1] + 1

    def run(self, workers: int, bar: Any) -> None:
        persisted = {s: w.persisted_upto for s, w in self.splits.items()}
        batches = _batches(self.files, self.start_file, self.start_ordinal, self.rule, persisted,
                           self.options.read_options(), self.stats)
        window: deque[tuple[_Batch, Future | None]] = deque()
        t0, docs, text_bytes = time.perf_counter(), 0, 0

        def drain_one() -> None:
            nonlocal docs, text_bytes
            batch, future = window.popleft()
            self.write(batch, future.result() if future is not None else None)
            docs += batch.documents
            text_bytes += batch.text_bytes
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{docs:,} docs, {docs / dt:,.0f} docs/s, {text_bytes / dt / 1e6:,.1f} MB/s of text", refresh=False)
            bar.update(batch.raw_bytes)

        pool = ThreadPoolExecutor(workers, thread_name_prefix="ember-prepare")
        try:
            with single_threaded():
                for batch in batches:
                    future = pool.submit(self.encoder.encode_batch, batch.texts) if batch.texts else None
                    window.append((batch, future))
                    if len(window) > 2 * workers:  # two batches per worker keep every core busy
                        drain_one()
                while window:
                    drain_one()
            for w in self.splits.values():
                w.close()
            if any(w.shards for w in self.splits.values()):
                self.save_progress()
        except BaseException:
            for w in self.splits.values():
                w.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _encoded_by(self) -> dict:
        """Which engine encoded this run's documents (not part of the plan: the ids are the same)."""
        by = {"engine": self.encoder.engine, "note": self.encoder.engine_note}
        if self.encoder.engine == "native":
            by["library_documents"] = self.encoder.library_documents  # held an added token's text
        return by

    def manifest(self) -> dict:
        stats = [st for st in self.stats if st is not None]
        train, val = self.splits["train"].summary(), self.splits["validation"].summary()
        total_docs = sum(st.documents for st in stats)
        if total_docs == 0:
            raise PrepareError(f"no documents in the inputs ({len(self.files)} files read)")
        if train["documents"] == 0:
            raise PrepareError(f"the validation split took all {total_docs} documents; nothing is left for training")
        dtype = open_dataset(self.output / train["shards"][0]["path"]).dtype  # as ShardWriter chose it
        return {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": self.plan["tokenizer"],
            "encoded_by": self._encoded_by(),
            "dtype": str(dtype),
            "inputs": self.plan["inputs"],
            "options": self.plan["options"],
            "splits": {"train": train, "validation": val},
            "totals": {
                "files": len(self.files),
                "documents": total_docs,
                "tokens": train["tokens"] + val["tokens"],
                "text_bytes": sum(st.text_bytes for st in stats),
                "skipped_empty": sum(st.empty for st in stats),
                "skipped_bad": sum(st.bad for st in stats),
            },
            "files": [{"path": f.name, "bytes": f.size, **st.to_dict()} for f, st in zip(self.files, stats)],
        }


def _make_bar(total: int, initial: int, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _input_specs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    return [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(i) for i in inputs]


def prepare(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike = "byte",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    validation_fraction: float | None = None,
    validation_count: int | None = None,
    bos: bool | None = None,
    eos: bool | None = None,
    text_field: str = "text",
    txt_mode: str = "file",
    skip_bad: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    native_bpe: bool = True,
) -> dict[str, Any]:
    """Tokenizes ``inputs`` into Ember shards under ``output`` and returns the manifest.

    Args:
        inputs: files, directories, globs (``.txt``, ``.jsonl``, ``.parquet``, each
            optionally ``.gz`` or ``.zst``) and ``"builtin:stdlib"``.
        output: directory to create; shards go to ``train/`` and ``validation/``, the
            description to ``manifest.json``.
        tokenizer: ``"byte"``, or a Hugging Face ``tokenizer.json`` or a directory holding one.
        shard_tokens: a shard is closed once it holds at least this many tokens
            (documents are never split).
        validation_fraction: this fraction of documents, evenly spread by ordinal, goes
            to ``validation/``; or ``validation_count``: the first that many documents.
        bos, eos: add the tokenizer's BOS / EOS token to each document (``True``), never
            (``False``), or as the tokenizer itself does (``None``).
        text_field: the JSON key / Parquet column holding the text.
        txt_mode: ``.txt`` documents: ``"file"`` (whole file), ``"line"`` or ``"paragraph"``
            (separated by blank lines).
        skip_bad: skip malformed records (bad JSON, bytes that are not UTF-8, null text)
            and count them, instead of stopping at the first.
        workers: tokenizer threads (default: one per available core). The output does
            not depend on it.
        overwrite: replace a finished output (or discard an interrupted one).
        progress: show a progress bar (default: when stderr is a terminal).
        native_bpe: encode byte-level BPE tokenizers of the GPT-2 and Llama 3 families
            with Ember's native encoder (the same ids as the ``tokenizers`` library,
            several times faster); ``False`` always uses the library. The output does
            not depend on it.

    An output left by an interrupted run is resumed when the inputs and options are
    unchanged. Problems raise :class:`PrepareError` (a ``ValueError``) saying where.
    """
    specs = _input_specs(inputs)
    options = make_options(
        tokenizer=tokenizer,
        shard_tokens=shard_tokens,
        validation_fraction=validation_fraction,
        validation_count=validation_count,
        bos=bos,
        eos=eos,
        text_field=text_field,
        txt_mode=txt_mode,
        skip_bad=skip_bad,
        workers=workers,
    )
    encoder = load_encoder(options.tokenizer, bos=bos, eos=eos, native=native_bpe)
    files = expand_inputs(specs)
    plan = {
        "inputs": specs,
        "files": [f.identity() for f in files],
        "tokenizer": encoder.describe(),
        "options": asdict(options),
    }
    out = Path(output)
    try:
        return _prepare_into(out, plan, files, encoder, options, overwrite, workers, progress)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        # Disk full, quota, permissions: the shards finished so far and progress.json are
        # written atomically, so the output stays resumable.
        raise PrepareError(
            f"{out}: {e}; the shards finished so far are kept: fix that (free space, permissions) and run "
            "the same command again to resume"
        ) from e


def _prepare_into(out: Path, plan: dict, files: list[SourceFile], encoder: DocumentEncoder, options: PrepareOptions,
                  overwrite: bool, workers: int | None, progress: bool | None) -> dict[str, Any]:
    with _exclusive(out):
        recorded = _open_output(out, plan, overwrite)
        if recorded:
            _remove_unrecorded(out, recorded)
        run = _Run(out, plan, files, encoder, options, recorded)
        if not recorded:
            run.save_progress()  # marks the directory as an ember prepare output in progress
        bar = _make_bar(sum(f.size for f in files), sum(f.size for f in files[: run.start_file]), progress)
        try:
            run.run(workers or _default_workers(), bar)
        finally:
            bar.close()
        manifest = run.manifest()
        _write_json_atomic(out / MANIFEST, manifest)
        (out / PROGRESS).unlink(missing_ok=True)
    return manifest


# -- for a training run ------------------------------------------------------------


def ensure_prepared(inputs: str | os.PathLike | Sequence[str | os.PathLike], output: str | os.PathLike,
                    options: PrepareOptions, *, workers: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """The manifest of ``output``, preparing it first (with ``options``, see :func:`make_options`)
    unless it is finished; an interrupted one is resumed.

    A finished output is used as it is, after checking that it was made from these inputs
    and options (input files are not looked at, so the corpus need not be on the training
    machines); one made otherwise raises :class:`PrepareError` listing the differences.
    """
    out = Path(output)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return prepare(inputs, output, workers=workers, progress=progress, **asdict(options))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    wanted = asdict(options)
    old = {"inputs": manifest.get("inputs"), "options": manifest.get("options")}
    new = {"inputs": _input_specs(inputs), "options": wanted}
    if old != new:
        changes = [f"inputs {old['inputs']} -> {new['inputs']}"] if old["inputs"] != new["inputs"] else []
        changes += [
            f"{k} {(old['options'] or {}).get(k)!r} -> {v!r}" for k, v in wanted.items() if (old["options"] or {}).get(k) != v
        ]
        raise PrepareError(
            f"{out} was prepared from other inputs or options ({'; '.join(changes)}); prepare it again "
            "(`ember prepare CONFIG --overwrite`, or prepare(..., overwrite=True)), or choose another output"
        )
    return manifest
