"""Tokenizers as ``ember prepare`` uses them: a batch of documents in, token ids out.

Two kinds: Ember's byte tokenizer (``"byte"``) and any local Hugging Face tokenizer
(a ``tokenizer.json`` file, or a directory holding one, with ``tokenizer_config.json``
naming its BOS/EOS tokens when present), run by the ``tokenizers`` library.

Every document becomes ``prefix + ids + suffix``: ``ids`` is the tokenizer's encoding
of the text without special tokens; ``prefix``/``suffix`` are what the tokenizer adds
itself (``bos``/``eos`` left to ``None``: Llama 3 adds ``<|begin_of_text|>``, the byte
tokenizer BOS and EOS), or exactly its BOS / EOS token when asked for (``True``), or
nothing (``False``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from ember.data.readers import PrepareError
from ember.data.tokenizer import ByteTokenizer

BYTE = "byte"
# The byte tokenizer has no file to hash; this names its mapping and specials instead.
BYTE_DESCRIPTION = "ember byte tokenizer v1: id = UTF-8 byte (0-255); BOS 256, EOS 257, PAD 258"


class DocumentEncoder:
    """Encodes batches of documents. ``encode_batch`` may run on several threads at once."""

    engine = "ember"  # what computes the ids
    engine_note = ""  # why, when it is not the fastest one
    kind: str
    name: str
    fingerprint: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    prefix: list[int]
    suffix: list[int]

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(tokens, lengths)``: every document's ids back to back as int64, and
        each document's length, BOS/EOS included."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        tokens, _ = self.encode_batch([text])
        return tokens.tolist()

    def describe(self) -> dict[str, Any]:
        """The manifest's ``tokenizer`` entry."""
        return {
            "kind": self.kind,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "prefix": self.prefix,
            "suffix": self.suffix,
        }


def _specials(default: list[int], known: int | None, wanted: bool | None, what: str, name: str) -> list[int]:
    if wanted is None:
        return default
    if not wanted:
        return []
    if known is None:
        raise PrepareError(
            f"tokenizer {name}: {what} is requested but the tokenizer defines no {what} token "
            f"(add {what.lower()}_token to its tokenizer_config.json, or leave {what.lower()} unset)"
        )
    return [known]


class ByteEncoder(DocumentEncoder):
    """Ember's byte tokenizer: one id per UTF-8 byte; BOS and EOS by default."""

    kind = BYTE
    name = BYTE

    def __init__(self, *, bos: bool | None = None, eos: bool | None = None):
        tok = ByteTokenizer()
        self.vocab_size = tok.vocab_size
        self.bos_id, self.eos_id = tok.BOS, tok.EOS
        self.prefix = _specials([tok.BOS], tok.BOS, bos, "BOS", BYTE)
        self.suffix = _specials([tok.EOS], tok.EOS, eos, "EOS", BYTE)
        self.fingerprint = "sha256:" + hashlib.sha256(BYTE_DESCRIPTION.encode()).hexdigest()

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        body = [t.encode("utf-8") for t in texts]
        extra = len(self.prefix) + len(self.suffix)
        lengths = np.fromiter((len(b) + extra for b in body), np.int64, len(body))
        tokens = np.empty(int(lengths.sum()), np.int64)
        ends = np.cumsum(lengths)
        if extra:
            is_body = np.ones(len(tokens), bool)
            starts = ends - lengths
            for i, t in enumerate(self.prefix):
                tokens[starts + i] = t
                is_body[starts + i] = False
            for i, t in enumerate(self.suffix):
                tokens[ends - len(self.suffix) + i] = t
                is_body[ends - len(self.suffix) + i] = False
            tokens[is_body] = np.frombuffer(b"".join(body), np.uint8)
        else:
            tokens[:] = np.frombuffer(b"".join(body), np.uint8)
        return tokens, lengths


def _token_content(value: Any) -> str | None:
    """A token in tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _resolve_hf_path(spec: str) -> tuple[Path, Path | None]:
    path = Path(spec)
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            hint = ""
            if any((path / n).is_file() for n in ("tokenizer.model", "vocab.json", "spiece.model")):
                hint = (
                    "; it holds a slow (SentencePiece/vocab) tokenizer: convert it once with "
                    "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
                )
            raise PrepareError(f"tokenizer {spec!r}: the directory has no tokenizer.json{hint}")
        config = path / "tokenizer_config.json"
        return file, config if config.is_file() else None
    if path.is_file():
        config = path.with_name("tokenizer_config.json")
        return path, config if config.is_file() else None
    raise PrepareError(f"tokenizer {spec!r}: no such file or directory (use 'byte', a tokenizer.json file, or a directory holding one)")


def _native_plan(spec: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Whether Ember's native byte-level BPE reproduces this tokenizer (its serialized
    JSON): the arguments of ``ember._native.BpeEncoder.from_byte_level`` and "", or
    None and why not. (What the tables cannot hold, such as a vocabulary missing some
    bytes, ``from_byte_level`` refuses.)"""
    from ember._native import SUPPORTED_PRETOKENIZER_PATTERNS

    if spec.get("normalizer") is not None:
        return None, "it has a normalizer"
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"its model is {model.get('type')!r}, not BPE"
    if model.get("dropout") not in (None, 0, 0.0):
        return None, "it uses BPE dropout"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "it uses subword prefixes or suffixes"
    pre = spec.get("pre_tokenizer") or {}
    byte_level = None
    if pre.get("type") == "ByteLevel":
        if not pre.get("use_regex", True):
            return None, "its ByteLevel pre-tokenizer splits without a regex"
        byte_level, pattern = pre, dict(SUPPORTED_PRETOKENIZER_PATTERNS)["gpt2"]
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        regex = (split.get("pattern") or {}).get("Regex")
        if (split.get("type"), split.get("behavior"), split.get("invert")) != ("Split", "Isolated", False) or regex is None:
            return None, "its pre-tokenizer is not a regex Split followed by ByteLevel"
        if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True):
            return None, "its pre-tokenizer is not a regex Split followed by ByteLevel"
        pattern = regex
    else:
        return None, f"its pre-tokenizer ({pre.get('type')!r}) is not byte-level"
    if byte_level.get("add_prefix_space"):
        return None, "its ByteLevel pre-tokenizer adds a prefix space"
    if pattern not in dict(SUPPORTED_PRETOKENIZER_PATTERNS).values():
        return None, "its pre-tokenizer regex is not one of the GPT-2 or cl100k (Llama 3) patterns"
    added = [t["content"] for t in spec.get("added_tokens", [])]
    return {
        "vocab": model.get("vocab", {}),
        "merges": model.get("merges", []),
        "pattern": pattern,
        "ignore_merges": bool(model.get("ignore_merges", False)),
        "added": added,
    }, ""


class HFEncoder(DocumentEncoder):
    """A Hugging Face ``tokenizers`` tokenizer loaded from a local ``tokenizer.json``.

    Truncation and padding saved in the file are switched off: a pretraining document
    is never cut. ``encode_batch`` releases the GIL; it runs single-threaded per call
    while :func:`single_threaded` is in force, so that ``ember prepare``'s worker
    threads, not the library's thread pool, spread the work over the cores.

    Byte-level BPE tokenizers of the GPT-2 and Llama 3 families are encoded by Ember's
    own Rust encoder (``engine == "native"``), which gives the library's ids several
    times faster; documents containing an added token's text, and every other kind
    of tokenizer, go through the library (``engine == "tokenizers"``).
    ``native=False`` always uses the library.
    """

    kind = "huggingface"

    def __init__(self, spec: str, *, bos: bool | None = None, eos: bool | None = None, native: bool = True):
        from tokenizers import Tokenizer

        file, config_file = _resolve_hf_path(spec)
        try:
            tok = Tokenizer.from_file(os.fspath(file))
        except Exception as e:  # the library raises a plain Exception for unreadable files
            raise PrepareError(f"tokenizer {spec!r}: cannot load {file}: {e}") from None
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster, same ids
        self.name = (file.parent.name if file.name == "tokenizer.json" else file.stem) or os.fspath(file)
        self.path = os.fspath(file)
        serialized = tok.to_str()
        self.fingerprint = "sha256:" + hashlib.sha256(serialized.encode()).hexdigest()
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

        named = {}
        if config_file is not None:
            try:
                named = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise PrepareError(f"tokenizer {spec!r}: cannot read {config_file}: {e}") from None
        auto_prefix, auto_suffix = self._added_by_post_processor(spec)
        self.bos_id = self._special_id(named.get("bos_token"), auto_prefix, spec, "bos_token")
        self.eos_id = self._special_id(named.get("eos_token"), auto_suffix, spec, "eos_token")
        self.prefix = _specials(auto_prefix, self.bos_id, bos, "BOS", spec)
        self.suffix = _specials(auto_suffix, self.eos_id, eos, "EOS", spec)

        self._native = None
        self.engine, self.engine_note = "tokenizers", "native BPE switched off (--library-tokenizer)"
        self.library_documents = 0  # with the native engine: documents handed to the library
        self._count_lock = threading.Lock()
        if native:
            plan, self.engine_note = _native_plan(json.loads(serialized))
            if plan is not None:
                from ember._native import BpeEncoder

                try:
                    self._native = BpeEncoder.from_byte_level(**plan)
                    self.engine = "native"
                except ValueError as e:  # what the tables cannot hold, e.g. a vocabulary missing some bytes
                    self.engine_note = str(e)

    def _special_id(self, configured: Any, added: list[int], spec: str, key: str) -> int | None:
        content = _token_content(configured)
        if content is not None:
            tid = self._tok.token_to_id(content)
            if tid is None:
                raise PrepareError(f"tokenizer {spec!r}: tokenizer_config.json's {key} {content!r} is not in the vocabulary")
            return tid
        return added[0] if len(added) == 1 else None

    def _added_by_post_processor(self, spec: str) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's post-processor puts before and after a document."""
        probe = "ember"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        full = self._tok.encode(probe, add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain) :]
        raise PrepareError(
            f"tokenizer {spec!r}: its post-processor changes the text's ids instead of adding tokens "
            "around them; set bos and eos explicitly"
        )

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._native is None:
            return self._library_batch(texts)
        encoded = self._native.encode_batch(texts, self.prefix, self.suffix)
        tokens = np.frombuffer(encoded.ids, "<u4").astype(np.int64)
        lengths = np.frombuffer(encoded.lengths, "<u8").astype(np.int64)
        deferred = encoded.deferred
        if not deferred:
            return tokens, lengths
        with self._count_lock:
            self.library_documents += len(deferred)
        # Documents holding an added token's text: the library's own encoding.
        parts = np.split(tokens, np.cumsum(lengths)[:-1])
        d_tokens, d_lengths = self._library_batch([texts[i] for i in deferred])
        for i, part, n in zip(deferred, np.split(d_tokens, np.cumsum(d_lengths)[:-1]), d_lengths):
            parts[i], lengths[i] = part, n
        return np.concatenate(parts), lengths

    def _library_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._encode(texts, add_special_tokens=False)
        if self.prefix or self.suffix:
            ids = [self.prefix + e.ids + self.suffix for e in encodings]
        else:
            ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum()))
        return tokens, lengths

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path}


def load_encoder(spec: str | os.PathLike, *, bos: bool | None = None, eos: bool | None = None, native: bool = True) -> DocumentEncoder:
    """``"byte"`` for Ember's byte tokenizer, else a ``tokenizer.json`` file or a directory
    with one (``native``: see :class:`HFEncoder`)."""
    spec = os.fspath(spec)
    if spec == BYTE:
        return ByteEncoder(bos=bos, eos=eos)
    return HFEncoder(spec, bos=bos, eos=eos, native=native)


class single_threaded:
    """Within the block, each ``tokenizers`` call runs on the calling thread
    (``TOKENIZERS_PARALLELISM=false``, which the library reads at every call); the
    previous setting comes back after."""

    VAR = "TOKENIZERS_PARALLELISM"

    def __enter__(self) -> None:
        self._saved = os.environ.get(self.VAR)
        os.environ[self.VAR] = "false"

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            os.environ.pop(self.VAR, None)
        else:
            os.environ[self.VAR] = self._saved
