"""Ember's built-in byte-level tokenizer: one id per UTF-8 byte plus three specials.

It needs no files, so the quickstart and the tests run offline.
"""

from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = True, eos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; specials are dropped and broken UTF-8 is replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
