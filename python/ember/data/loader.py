"""``TokenLoader``: batches of fixed-length samples from token shards.

The sampling contract (see docs/data-loader.md): each dataset is cut into
samples of ``seq_len + 1`` tokens with stride ``seq_len``, packed across
document boundaries; a seeded permutation orders each epoch; several datasets
are interleaved by weight with exact proportions; and global batch ``b`` is the
same whatever the world size, each rank taking a consecutive slice of it.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ember import _native

STATE_VERSION = 1

PathLike = str | os.PathLike


def _datasets(paths: PathLike | Sequence[PathLike] | Mapping[PathLike, float]) -> list[tuple[list[str], float]]:
    """A path or a list of paths is one dataset; a mapping blends datasets by weight."""
    if isinstance(paths, (str, os.PathLike)):
        return [([os.fspath(paths)], 1.0)]
    if isinstance(paths, Mapping):
        if not paths:
            raise ValueError("no datasets given")
        out = []
        for p, w in paths.items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
                raise ValueError(f"dataset {os.fspath(p)!r}: weight must be a positive number, got {w!r}")
            out.append(([os.fspath(p)], float(w)))
        return out
    paths = list(paths)
    if not paths:
        raise ValueError("no dataset paths given")
    return [([os.fspath(p) for p in paths], 1.0)]


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class TokenLoader:
    """Iterates ``{"input_ids", "labels"}`` int64 tensors of shape ``(batch_size, seq_len)``.

    Args:
        paths: a path, a list of paths (one dataset), or ``{path: weight}`` to blend datasets.
            Each path is an Ember shard, a Megatron ``.bin``/``.idx``/prefix, an llm.c shard,
            or a directory of shards.
        seq_len: tokens per sample fed to the model (each sample reads ``seq_len + 1``).
        batch_size: samples per batch on this rank (the micro-batch).
        seed: seeds the sample order.
        rank, world_size: this process's slice of each global batch. Default: from
            ``torch.distributed`` if initialised, else ``RANK``/``WORLD_SIZE``, else 0/1.
        shuffle: ``True`` for training (seeded order, endless epochs); ``False`` reads every
            sample once in order, e.g. for validation; each new ``iter()`` after the end
            starts a new pass.
        drop_last: in sequential mode, skip a final global batch that is not full, so every
            rank yields the same number of batches.
        position_ids: add ``position_ids`` that restart at 0 at each document start.
        cu_seqlens: add ``cu_seqlens`` (int32 cumulative document lengths over the flattened
            batch, for variable-length attention) and ``max_seqlen``.
        num_threads: background threads that copy samples out of the shards.
        prefetch: batches prepared ahead of the consumer.
        pin_memory: place batches in pinned memory (default: when CUDA is available) so
            ``.to("cuda", non_blocking=True)`` is asynchronous.
        max_open_shards: most shard files mapped at once per dataset (capped at a quarter of
            the kernel's per-process mapping limit).
        llmc_delimiter: token that starts each document in llm.c shards (default:
            50256 for uint16 shards, 128000 for uint32 shards).
        vocab_size: the model's vocabulary. When given, every token id handed out (in
            ``input_ids`` and ``labels``) is checked, while Rust fills the batch, to be in
            ``0 .. vocab_size - 1``; ``next()`` raises :class:`ember.data.ShardFormatError`
            (a ``ValueError``) for the batch that holds one outside, naming the file, the
            document and the id. Batches prepared ahead but never taken raise nothing.

    Each batch is a set of new tensors that the caller owns; the loader never
    writes into a tensor after handing it out.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike] | Mapping[PathLike, float],
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        position_ids: bool = False,
        cu_seqlens: bool = False,
        num_threads: int = 2,
        prefetch: int = 8,
        pin_memory: bool | None = None,
        max_open_shards: int = 4096,
        llmc_delimiter: int | None = None,
        vocab_size: int | None = None,
    ):
        if rank is None or world_size is None:
            default_rank, default_world = _default_rank_world()
            rank = default_rank if rank is None else rank
            world_size = default_world if world_size is None else world_size
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._want_position_ids = position_ids
        self._want_cu_seqlens = cu_seqlens
        self._prefetch = int(prefetch)
        self._pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._native = _native.Loader(
            _datasets(paths),
            self.seq_len,
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=drop_last,
            num_threads=num_threads,
            max_open_shards=max_open_shards,
            llmc_delimiter=llmc_delimiter,
            vocab_size=vocab_size,
        )
        self._queue: deque[tuple[_native.PlannedBatch, dict[str, torch.Tensor]]] = deque()
        self._position = 0  # global samples consumed by the caller
        self._exhausted = False

    # -- iteration ---------------------------------------------------------

    def _buffers(self) -> dict[str, torch.Tensor]:
        shape = (self.batch_size, self.seq_len)
        tokens = torch.empty((2, *shape), dtype=torch.int64, pin_memory=self._pin)
        bufs = dict(zip(("input_ids", "labels"), tokens.unbind(0)))
        if self._want_position_ids:
            bufs["position_ids"] = torch.empty(shape, dtype=torch.int64, pin_memory=self._pin)
        if self._want_cu_seqlens:
            bufs["cu_seqlens"] = torch.empty(self.batch_size * self.seq_len + 1, dtype=torch.int32, pin_memory=self._pin)
        return bufs

    def _top_up(self) -> None:
        # Refill in groups: one group costs one wake-up of a loader thread.
        if len(self._queue) > self._prefetch // 2:
            return
        groups = [self._buffers() for _ in range(self._prefetch - len(self._queue))]
        # NumPy views share the tensors' memory: the loader threads write into the
        # tensors themselves, after Rust has checked each view's type and size.
        requests = [
            _native.BatchBuffers(
                bufs["input_ids"].numpy(),
                bufs["labels"].numpy(),
                position_ids=bufs["position_ids"].numpy() if "position_ids" in bufs else None,
                cu_seqlens=bufs["cu_seqlens"].numpy() if "cu_seqlens" in bufs else None,
            )
            for bufs in groups
        ]
        self._queue.extend(zip(self._native.submit(requests), groups))

    def __iter__(self) -> TokenLoader:
        if self._exhausted:
            self._seek(0)
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._queue:
            self._top_up()
            if not self._queue:
                self._exhausted = True
                raise StopIteration
        planned, bufs = self._queue.popleft()
        filled = self._native.wait(planned.ticket)
        self._position = planned.end
        self._top_up()
        batch: dict[str, Any] = bufs
        if planned.rows != self.batch_size:  # only the last batch of a sequential pass without drop_last
            batch = {k: v[: planned.rows] for k, v in bufs.items()}
        if self._want_cu_seqlens:
            batch["cu_seqlens"] = bufs["cu_seqlens"][: filled.num_cu_seqlens]
            batch["max_seqlen"] = filled.max_seqlen
        return batch

    def __len__(self) -> int:
        n = self._native.num_batches
        if n is None:
            raise TypeError("a shuffling TokenLoader is endless; len() is defined for shuffle=False")
        return n

    # -- state -------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Identifies the datasets, weights, seq_len and shuffle mode behind the sample stream."""
        return self._native.fingerprint

    @property
    def position(self) -> int:
        """Global samples consumed so far (over all ranks)."""
        return self._position

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "position": self._position,
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from a :meth:`state_dict`, possibly saved on another world size."""
        missing = {"version", "seed", "position", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"TokenLoader state is missing {sorted(missing)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"TokenLoader state has version {state['version']}; this Ember reads version {STATE_VERSION}")
        if state["seed"] != self.seed:
            raise ValueError(f"TokenLoader state was saved with seed {state['seed']}, but this loader has seed {self.seed}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "TokenLoader state was saved for a different data stream "
                f"(fingerprint {state['fingerprint']}, this loader {self.fingerprint}): "
                "the datasets, their weights, seq_len or shuffle mode changed"
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"TokenLoader state has a negative position {position}")
        self._seek(position)

    def reset(self) -> None:
        """Goes back to the first batch (the start of the pass, or of the first epoch)."""
        self._seek(0)

    def _seek(self, position: int) -> None:
        self._native.seek(position)
        self._queue.clear()
        self._position = position
        self._exhausted = False

    def close(self) -> None:
        """Stops the background threads after finishing queued batches."""
        self._native.cancel_all()
        self._queue.clear()

    def __repr__(self) -> str:
        return (
            f"TokenLoader(seq_len={self.seq_len}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
            f"shuffle={self.shuffle}, position={self._position})"
        )
