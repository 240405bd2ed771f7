"""An independent, pure-Python/NumPy reference of Ember's sampling contract.

Written from the contract's prose (docs of ``TokenLoader`` and the sampling
contract), not from the Rust sources: the property tests compare the real
loader with this module token for token, so any divergence in the permutation,
the blending rule, the batch layout, ``position_ids`` or ``cu_seqlens`` shows up.

Nothing here imports ``ember``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

MASK64 = (1 << 64) - 1
ROUNDS = 6


# -- hashing and permutation -------------------------------------------------


def mix(z: int) -> int:
    """SplitMix64's finaliser on a uint64 (all arithmetic mod 2**64)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class Permutation:
    """Seeded bijection of ``range(n)``: a 6-round balanced Feistel network on
    ``2 * half`` bits plus cycle-walking down to ``n``."""

    def __init__(self, n: int, seed: int, stream: int, epoch: int):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        base = mix(mix(mix(seed & MASK64) ^ (stream & MASK64)) ^ (epoch & MASK64))
        self.keys = [mix(base ^ r) for r in range(ROUNDS)]

    def feistel(self, x: int) -> int:
        h, mask = self.half, self.mask
        left, right = x >> h, x & mask
        for k in self.keys:
            left, right = right, left ^ (mix(right ^ k) & mask)
        return (left << h) | right

    def apply(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self.feistel(i)
        while x >= self.n:
            x = self.feistel(x)
        return x


# -- the global sample order ---------------------------------------------------


def normalise(weights: Sequence[float]) -> list[float]:
    total = 0.0
    for w in weights:
        total += float(w)
    return [float(w) / total for w in weights]


def shuffled_draws(sizes: Sequence[int], weights: Sequence[float], seed: int) -> Iterator[tuple[int, int]]:
    """Endless ``(dataset, sample id)`` draws in shuffled mode."""
    sizes = list(sizes)
    w = normalise(weights)
    k_count = len(sizes)
    counts = [0] * k_count
    g = 0
    perms: dict[tuple[int, int], Permutation] = {}
    while True:
        if k_count == 1:
            k = 0
        else:
            target = float(g + 1)
            k, best = 0, w[0] * target - counts[0]
            for j in range(1, k_count):
                gap = w[j] * target - counts[j]
                if gap > best:
                    k, best = j, gap
        c = counts[k]
        counts[k] += 1
        g += 1
        n = sizes[k]
        epoch = c // n
        key = (k, epoch)
        if key not in perms:
            if len(perms) > 64:
                perms.clear()
            perms[key] = Permutation(n, seed, k, epoch)
        yield k, perms[key].apply(c % n)


def sequential_draws(sizes: Sequence[int]) -> Iterator[tuple[int, int]]:
    for k, n in enumerate(sizes):
        for j in range(n):
            yield k, j


def draws(sizes: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool) -> Iterator[tuple[int, int]]:
    return shuffled_draws(sizes, weights, seed) if shuffle else sequential_draws(sizes)


# -- datasets as token streams ---------------------------------------------------


@dataclass
class RefDataset:
    """One dataset: its concatenated token stream and every position at which a
    document starts (document starts and shard starts)."""

    tokens: np.ndarray  # int64
    doc_starts: set[int] = field(default_factory=set)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def num_samples(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    @classmethod
    def from_shards(cls, shards: Sequence[Sequence[Sequence[int]]]) -> RefDataset:
        """``shards[s][d]`` is document ``d`` of shard ``s``, in stream order."""
        parts: list[np.ndarray] = []
        starts: set[int] = set()
        pos = 0
        for shard in shards:
            starts.add(pos)  # a shard starts a new document
            for doc in shard:
                starts.add(pos)
                arr = np.asarray(doc, dtype=np.int64).reshape(-1)
                parts.append(arr)
                pos += len(arr)
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return cls(tokens.astype(np.int64), starts)

    @classmethod
    def from_parts(cls, parts: Sequence[tuple[np.ndarray, Sequence[int]]]) -> RefDataset:
        """``parts`` = per shard ``(tokens, document start offsets within the shard)``."""
        toks: list[np.ndarray] = []
        starts: set[int] = set()
        pos = 0
        for tokens, doc_starts in parts:
            t = np.asarray(tokens, dtype=np.int64).reshape(-1)
            starts.add(pos)
            starts.update(pos + int(s) for s in doc_starts)
            toks.append(t)
            pos += len(t)
        tokens = np.concatenate(toks) if toks else np.zeros(0, np.int64)
        return cls(tokens, starts)

    def sample(self, j: int, seq_len: int) -> np.ndarray:
        a = j * seq_len
        s = self.tokens[a : a + seq_len + 1]
        assert len(s) == seq_len + 1
        return s

    def breaks(self, j: int, seq_len: int) -> list[int]:
        """Offsets in ``1..seq_len-1`` of the input window of sample ``j`` where a document starts."""
        a = j * seq_len
        return sorted(p - a for p in self.doc_starts if a < p < a + seq_len)


def llmc_doc_starts(tokens: np.ndarray, delimiter: int) -> list[int]:
    """Documents of an llm.c shard: one starts at 0 and at every later delimiter token."""
    t = np.asarray(tokens, dtype=np.int64)
    if len(t) == 0:
        return []
    return [0] + [int(p) for p in np.nonzero(t[1:] == delimiter)[0] + 1]


# -- batches ---------------------------------------------------------------------


def global_draw_list(
    datasets: Sequence[RefDataset],
    weights: Sequence[float],
    seq_len: int,
    seed: int,
    shuffle: bool,
    count: int | None,
) -> list[tuple[int, int]]:
    """The first ``count`` global draws (all of them in sequential mode when ``count`` is None)."""
    sizes = [d.num_samples(seq_len) for d in datasets]
    if any(n == 0 for n in sizes):
        raise ValueError("a dataset has no sample")
    it = draws(sizes, weights, seed, shuffle)
    out = []
    for _ in range(count if count is not None else sum(sizes)):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def make_batch(
    datasets: Sequence[RefDataset],
    picks: Sequence[tuple[int, int]],
    seq_len: int,
    position_ids: bool,
    cu_seqlens: bool,
) -> dict:
    L = seq_len
    rows = len(picks)
    inp = np.zeros((rows, L), np.int64)
    lab = np.zeros((rows, L), np.int64)
    pos = np.zeros((rows, L), np.int64)
    cu = [0]
    max_seqlen = 0
    for r, (k, j) in enumerate(picks):
        s = datasets[k].sample(j, L)
        inp[r] = s[:L]
        lab[r] = s[1:]
        bounds = datasets[k].breaks(j, L) + [L]
        start = 0
        for b in bounds:
            pos[r, start:b] = np.arange(b - start)
            cu.append(r * L + b)
            max_seqlen = max(max_seqlen, b - start)
            start = b
    out: dict = {"input_ids": inp, "labels": lab}
    if position_ids:
        out["position_ids"] = pos
    if cu_seqlens:
        out["cu_seqlens"] = np.asarray(cu, np.int32)
        out["max_seqlen"] = max_seqlen
    return out


def reference_batches(
    datasets: Sequence[RefDataset],
    weights: Sequence[float],
    seq_len: int,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    drop_last: bool = True,
    position_ids: bool = False,
    cu_seqlens: bool = False,
    num_batches: int | None = None,
    start_position: int = 0,
) -> list[dict]:
    """Rank ``rank``'s batches, starting at global sample ``start_position``.

    Shuffled mode is endless, so ``num_batches`` is required there; in
    sequential mode it caps the number of batches (default: the whole pass).
    """
    G = batch_size * world_size
    if shuffle and num_batches is None:
        raise ValueError("shuffled mode is endless: give num_batches")
    if shuffle:
        all_draws = global_draw_list(datasets, weights, seq_len, seed, True, start_position + G * num_batches)
    else:
        all_draws = global_draw_list(datasets, weights, seq_len, seed, False, None)
    all_draws = all_draws[start_position:]
    out = []
    b = 0
    while num_batches is None or b < num_batches:
        glob = all_draws[b * G : (b + 1) * G]
        if not glob or (drop_last and not shuffle and len(glob) < G):
            break
        mine = glob[rank * batch_size : (rank + 1) * batch_size]
        out.append(make_batch(datasets, mine, seq_len, position_ids, cu_seqlens))
        b += 1
    return out
