"""Types of ``ember._native``, the compiled half of ``ember.data`` (``rust/ember-py``).

The module is private: ``ember.data`` wraps it. ``tests/test_native_stub.py``
checks that this stub and the module declare the same names.
"""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import final

import numpy as np
import numpy.typing as npt

_StrPath = str | os.PathLike[str]

__version__: str

SUPPORTED_PRETOKENIZER_PATTERNS: list[tuple[str, str]]
"""(name, regex) of each pre-tokenizer ``BpeEncoder`` reproduces."""

class ShardFormatError(ValueError):
    """A shard file is malformed: the message names the file and the offset or field."""

# -- shards ------------------------------------------------------------------

@final
class ShardWriter:
    """Writes one Ember shard; it appears at ``path`` only when ``finish`` succeeds."""

    def __init__(self, path: _StrPath, vocab_size: int) -> None: ...
    def add_document_bytes(self, data: bytes) -> None:
        """Appends one document given as little-endian int64 bytes."""
    def finish(self) -> Path:
        """Completes the shard and returns its path (only the path, once closed)."""
    def abort(self) -> None:
        """Discards everything written; ``path`` is left untouched."""
    @property
    def closed(self) -> bool: ...
    @property
    def num_docs(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def dtype(self) -> str:
        """NumPy name of the stored token type: ``"uint16"`` or ``"uint32"``."""

@final
class ShardInfo:
    """One shard of a ``Dataset``, as its header describes it."""

    @property
    def path(self) -> Path:
        """The path that names the shard (for Megatron, the ``.idx`` file)."""
    @property
    def format(self) -> str:
        """``"ember"``, ``"megatron"`` or ``"llmc"``."""
    @property
    def dtype(self) -> str:
        """NumPy name of the stored token type."""
    @property
    def num_tokens(self) -> int: ...
    @property
    def vocab_size(self) -> int | None:
        """The tokenizer vocabulary size the shard records; None where the format has none."""

@final
class DocLocation:
    """Where one document's tokens lie: ``length`` values of ``dtype`` from byte ``offset`` of ``path``."""

    @property
    def path(self) -> str:
        """The file that holds the tokens (for Megatron, the ``.bin`` file); a ``str``,
        as it is read for every document."""
    @property
    def offset(self) -> int:
        """Byte offset of the document's first token in ``path``."""
    @property
    def length(self) -> int:
        """Length in tokens."""
    @property
    def dtype(self) -> str: ...

@final
class Dataset:
    """One dataset: a shard, a Megatron pair, an llm.c file, or a directory of shards."""

    def __init__(
        self, paths: Sequence[_StrPath], *, llmc_delimiter: int | None = None, max_open_shards: int = 4096
    ) -> None: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_shards(self) -> int: ...
    @property
    def num_open(self) -> int:
        """Shards mapped right now."""
    def num_docs(self) -> int: ...
    def shards(self) -> list[ShardInfo]: ...
    def doc_location(self, i: int) -> DocLocation:
        """Raises ``IndexError`` unless ``0 <= i < num_docs()``."""
    def validate(self, check_tokens: bool = False, vocab_size: int | None = None) -> None:
        """Checks every shard's index and, with ``check_tokens``, every token id against
        ``vocab_size`` (default: the vocabulary size each shard records)."""
    def read_tokens(self, start: int, count: int) -> list[int]:
        """Tokens ``start .. start + count`` of the concatenated dataset."""

# -- batches -----------------------------------------------------------------

@final
class BatchBuffers:
    """The arrays one batch is written into, each a writable, C-contiguous
    ``numpy.ndarray`` itself, not a subclass (a CPU tensor's ``.numpy()`` view shares
    the tensor's memory): ``input_ids``, ``labels`` and ``position_ids`` int64 with
    ``batch_size * seq_len`` values, ``cu_seqlens`` int32 with
    ``batch_size * seq_len + 1``. ``Loader.submit`` checks them, and holds this
    object, and so the arrays and the memory they keep alive, until the batch is done.

    Until ``Loader.wait`` has returned for the batch (or ``cancel_all`` or ``seek``
    has dropped it), loader threads write the arrays' memory: it must be neither
    resized nor reallocated (``ndarray.resize(refcheck=False)``, ``Tensor.resize_``,
    ``Tensor.set_``), nor read or written."""

    def __init__(
        self,
        input_ids: npt.NDArray[np.int64],
        labels: npt.NDArray[np.int64],
        *,
        position_ids: npt.NDArray[np.int64] | None = None,
        cu_seqlens: npt.NDArray[np.int32] | None = None,
    ) -> None: ...
    @property
    def input_ids(self) -> npt.NDArray[np.int64]: ...
    @property
    def labels(self) -> npt.NDArray[np.int64]: ...
    @property
    def position_ids(self) -> npt.NDArray[np.int64] | None: ...
    @property
    def cu_seqlens(self) -> npt.NDArray[np.int32] | None: ...

@final
class PlannedBatch:
    """A batch ``Loader.submit`` queued."""

    @property
    def ticket(self) -> int:
        """What to pass to ``Loader.wait``."""
    @property
    def rows(self) -> int:
        """Rows it fills: ``batch_size``, or fewer at the end of a sequential pass."""
    @property
    def start(self) -> int:
        """Global sample position before its global batch."""
    @property
    def end(self) -> int:
        """Global sample position after its global batch."""

@final
class FilledBatch:
    """What a finished batch reports besides the arrays it filled."""

    @property
    def num_cu_seqlens(self) -> int:
        """Entries written to ``cu_seqlens`` (0 without it)."""
    @property
    def max_seqlen(self) -> int:
        """Longest document segment in the batch."""

@final
class Loader:
    """The batch pipeline behind ``ember.data.TokenLoader``: background threads fill
    caller-owned arrays, without the GIL."""

    def __init__(
        self,
        datasets: Sequence[tuple[Sequence[_StrPath], float]],
        seq_len: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_threads: int = 2,
        max_open_shards: int = 4096,
        llmc_delimiter: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """``datasets``: (paths of one dataset, weight) pairs. With ``vocab_size``, a batch
        holding a token id outside ``0..vocab_size`` fails in ``wait``."""
    def submit(self, batches: Sequence[BatchBuffers]) -> list[PlannedBatch]:
        """Plans the next batches and queues them, as one group, to be written into
        ``batches``; fewer than given at the end of a sequential pass. Raises
        ``TypeError``/``ValueError`` naming the array, before planning anything, if
        one has the wrong type, layout or length, or shares memory with another."""
    def wait(self, ticket: int) -> FilledBatch:
        """Blocks, without the GIL, until batch ``ticket`` is written. Raises the batch's
        own error, if it had one: ``ShardFormatError`` naming the file, the document and
        the id of a token outside ``vocab_size``. A batch never waited for raises nothing."""
    def cancel_all(self) -> None:
        """Waits for every queued batch and forgets them."""
    def seek(self, position: int) -> None:
        """Repositions the stream at global sample ``position``; queued batches are dropped."""
    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the datasets, weights, ``seq_len`` and shuffle mode."""
    @property
    def planned_position(self) -> int:
        """Global samples planned so far, queued or not."""
    @property
    def num_batches(self) -> int | None:
        """Batches in one sequential pass; None when shuffling (endless)."""
    @property
    def sizes(self) -> list[int]:
        """Samples in each dataset."""
    @property
    def num_tokens(self) -> list[int]:
        """Tokens in each dataset."""
    @property
    def num_open(self) -> int:
        """Shards mapped right now, over all datasets."""

# -- tokenizer ---------------------------------------------------------------

@final
class EncodedBatch:
    """What ``BpeEncoder.encode_batch`` returns, as bytes for ``np.frombuffer``."""

    @property
    def ids(self) -> bytes:
        """Every document's ids, one after another, as little-endian uint32."""
    @property
    def lengths(self) -> bytes:
        """Each document's length in ids, as little-endian uint64."""
    @property
    def deferred(self) -> list[int]:
        """Indices of the documents left undone (length 0) because they hold an added
        token's text: the caller encodes those itself."""

@final
class BpeEncoder:
    """Byte-level BPE, as ``ember prepare`` runs it."""

    def __init__(
        self,
        vocab: Sequence[tuple[bytes, int]],
        merges: Sequence[tuple[bytes, bytes]],
        pattern: str,
        *,
        ignore_merges: bool = False,
        added: Sequence[str] = ...,
    ) -> None:
        """``vocab``: (token bytes, id) pairs; ``merges``: (left, right) in rank order;
        ``pattern``: the pre-tokenizer regex; ``added``: every added token's text."""
    @staticmethod
    def from_byte_level(
        vocab: dict[str, int],
        merges: Sequence[str | Sequence[str]],
        pattern: str,
        *,
        ignore_merges: bool = False,
        added: Sequence[str] = ...,
    ) -> BpeEncoder:
        """The same from a ``tokenizer.json`` BPE model as it stands: tokens spelled in
        the byte-level alphabet, merges as ``"left right"`` or ``[left, right]``."""
    def encode_batch(self, texts: Sequence[str], prefix: Sequence[int] = ..., suffix: Sequence[int] = ...) -> EncodedBatch:
        """Encodes ``texts``, each between ``prefix`` and ``suffix``, without the GIL."""
    def encode(self, text: str) -> list[int]:
        """The ids of one text, without special tokens."""
    def pre_tokenize(self, text: str) -> list[tuple[int, int]]:
        """The pre-tokens of ``text`` as (start, end) character offsets."""

def jsonl_texts(lines: Sequence[bytes], key: str) -> tuple[list[str | None], list[int]]:
    """Per JSON Lines record: its ``key`` text field (None for a line to be read by
    Python's own parser), and that text's length in UTF-8 bytes (0 with None)."""
