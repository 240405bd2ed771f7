"""Llama architecture hyperparameters, the published presets, and size and FLOP arithmetic.

Field names are Hugging Face's ``LlamaConfig`` names, so a checkpoint's ``config.json``
maps onto :class:`LlamaConfig` field for field.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

LLAMA3_ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    """A Llama architecture; the defaults are Llama 2 7B's.

    ``num_key_value_heads=None`` means one key/value head per query head (no grouping);
    ``head_dim=None`` means ``hidden_size // num_attention_heads``. Read the resolved values
    from :attr:`kv_heads` and :attr:`head_size`. ``rope_scaling`` is None or Llama 3.1's
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``num_key_value_heads``, or ``num_attention_heads`` when unset."""
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Features per attention head: ``head_dim``, or ``hidden_size // num_attention_heads`` when unset."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """The preset ``name`` from :data:`PRESETS`, with ``overrides`` replacing its fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; known presets: {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown LlamaConfig field(s) {', '.join(unknown)} overriding preset {name!r}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    def validate(self) -> list[tuple[str, str]]:
        """Every problem with this architecture as ``(field, message)``; empty when it is usable."""
        problems = []
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in (*sizes, "max_position_embeddings"):
            if getattr(self, name) < 1:
                problems.append((name, f"must be a positive integer, got {getattr(self, name)}"))
        for name in ("num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append((name, f"must be a positive integer or unset, got {value}"))
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            if not getattr(self, name) > 0:
                problems.append((name, f"must be positive, got {getattr(self, name)}"))
        if problems:
            return problems  # the checks below divide by these fields
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            problems.append((
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads ({self.num_attention_heads}); "
                "set head_dim or change one",
            ))
        if self.num_attention_heads % self.kv_heads:
            heads = self.num_attention_heads
            problems.append(("num_key_value_heads", f"{self.kv_heads} does not divide num_attention_heads ({heads})"))
        if self.head_size % 2:
            problems.append(("head_dim", f"rotary embeddings need an even head dimension, got {self.head_size}"))
        problems += _rope_scaling_problems(self.rope_scaling)
        return problems


def _rope_scaling_problems(scaling: dict[str, Any] | None) -> list[tuple[str, str]]:
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [("rope_scaling", f"must be None or a mapping, got {scaling!r}")]
    if scaling.get("rope_type") != "llama3":
        return [("rope_scaling.rope_type", f"only 'llama3' is supported, got {scaling.get('rope_type')!r}")]
    problems = []
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        problems.append(("rope_scaling", f"missing {', '.join(missing)}"))
    unknown = sorted(set(scaling) - set(LLAMA3_ROPE_KEYS))
    if unknown:
        expected = ", ".join(LLAMA3_ROPE_KEYS)
        problems.append(("rope_scaling", f"unknown key(s) {', '.join(unknown)}; expected {expected}"))
    for key in LLAMA3_ROPE_KEYS[1:]:
        value = scaling.get(key)
        if key in scaling and not (isinstance(value, (int, float)) and value > 0):
            problems.append((f"rope_scaling.{key}", f"must be a positive number, got {value!r}"))
    if not problems and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        problems.append(("rope_scaling.high_freq_factor", "must be greater than low_freq_factor"))
    return problems


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0)

# Field values from the official Meta / Hugging Face config.json of each model.
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0,
    ),
    "llama3-8b": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=8192,
    ),
    "llama3.1-8b": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=131072, rope_scaling=_llama3_rope(8.0),
    ),
    "llama3.1-70b": dict(
        _LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, max_position_embeddings=131072, rope_scaling=_llama3_rope(8.0),
    ),
    "llama3.2-1b": dict(
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        head_dim=64, max_position_embeddings=131072, rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True,
    ),
    "llama3.2-3b": dict(
        _LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        head_dim=128, max_position_embeddings=131072, rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True,
    ),
    # For tests: every feature (grouped-query attention, separate output layer) at toy size.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    # Byte-level (259 ids) and about 3M parameters: learns visibly in a few CPU minutes at seq 256.
    "quickstart": dict(
        vocab_size=259, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}


def num_params(config: LlamaConfig, include_embedding: bool = True) -> int:
    """Parameters of :class:`~ember.model.Llama` built from ``config``, from its arithmetic.

    ``include_embedding=False`` leaves out the input embedding table, which is a lookup,
    not a matmul. With tied embeddings the one shared matrix is also the output layer,
    a matmul, so it is counted either way.
    """
    h, hd = config.hidden_size, config.head_size
    attention = h * config.num_attention_heads * hd * 2 + h * config.kv_heads * hd * 2  # wq, wo; wk, wv
    block = attention + 3 * h * config.intermediate_size + 2 * h  # + w1, w2, w3; two norms
    table = config.vocab_size * h
    total = config.num_hidden_layers * block + h + table  # + final norm, output layer
    if not config.tie_word_embeddings and include_embedding:
        total += table
    return total


def transformer_flops_per_token(
    num_params_non_embedding: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int
) -> int:
    """Model FLOPs to train on one token: ``6 * N + 6 * num_layers * num_heads * head_dim * seq_len``.

    ``6 * N``: each of the N non-embedding weights does one multiply-add (2 FLOPs) per token in the
    forward pass and two in the backward (gradients for the input and for the weight), 2 + 4 = 6.
    The embedding lookup is a gather, not a matmul, so it is left out of N; an untied output head
    is a matmul and belongs in N.

    Attention term: per layer and head, a token's query meets ``seq_len`` keys (``q @ k.T``) and
    ``seq_len`` values (``p @ v``), ``2 * head_dim * seq_len`` multiply-adds, 12 FLOPs per
    multiply-add over forward and backward, so ``12 * num_layers * num_heads * head_dim * seq_len``
    for full attention. Under a causal mask a token attends on average to half the sequence, which
    gives the factor 6. torchtitan counts the full 12 (it does not credit the causal mask), so its
    MFU for the same run is higher by the difference. Recomputation (activation checkpointing,
    flash attention's backward) is not counted: MFU measures useful work.
    """
    return 6 * num_params_non_embedding + 6 * num_layers * num_heads * head_dim * seq_len


def flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token of this architecture (:func:`transformer_flops_per_token`)."""
    n = num_params(config, include_embedding=False)
    return transformer_flops_per_token(n, config.num_hidden_layers, config.num_attention_heads, config.head_size, seq_len)
