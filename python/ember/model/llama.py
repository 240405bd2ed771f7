"""The Llama decoder: grouped-query attention, RoPE, SwiGLU, RMSNorm (torchtitan's module names)."""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ember.kernels import RMSNorm, apply_rotary, fused_linear_cross_entropy, swiglu

from .config import LlamaConfig
from .rope import rope_cos_sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.kv_heads, config.head_size
        dim = config.hidden_size
        self.wq = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        # In place: q and k are fresh projections that autograd does not keep.
        q, k = apply_rotary(q, k, cos, sin, inplace=True)
        # Query head h reads key/value head h // (n_heads // n_kv_heads). The flag is set only
        # when heads are grouped: some fused SDPA backends refuse any call that sets it.
        grouped = self.n_kv_heads != self.n_heads
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=grouped
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The residual add before the FFN is fused into its norm: one pass over the activations.
        normed, h = self.ffn_norm(self.attention(self.attention_norm(x), cos, sin), residual=x)
        return h + self.feed_forward(normed)


class Llama(nn.Module):
    """A Llama decoder-only language model.

    Build large models without allocating memory, then materialise them where they go::

        with torch.device("meta"):
            model = Llama(config)
        model.to_empty(device="cuda")
        model.init_weights(seed=0)      # or load a checkpoint

    ``rope_cos`` and ``rope_sin`` are float32 buffers computed from the config, kept out of
    the state dict; :meth:`to_empty` and :meth:`init_weights` rebuild them (in float32, even
    after ``model.to(torch.bfloat16)``).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        problems = config.validate()
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(f"{field}: {msg}" for field, msg in problems))
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    # -- forward ---------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final normed hidden states (batch, seq, hidden_size) for ``input_ids`` (batch, seq).

        ``position_ids`` (batch, seq) only choose the rotary positions (e.g. restarting at
        each packed document); attention stays causal over the whole sequence.
        """
        seq = input_ids.shape[1]
        if position_ids is None:
            limit = self.config.max_position_embeddings
            if seq > limit:
                raise ValueError(f"sequence length {seq} exceeds max_position_embeddings ({limit})")
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            if position_ids.shape != input_ids.shape:
                raise ValueError(
                    f"position_ids must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(position_ids.shape)}"
                )
            # Gather once here rather than in every layer.
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        **loss_options,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab_size); given ``labels``, the loss of :meth:`loss` instead.

        Wrappers (DDP, FSDP2, DeepSpeed) act when the model is called, so a wrapped model
        computes its training loss with ``model(input_ids, labels)``.
        """
        if labels is not None:
            return self.loss(input_ids, labels, position_ids=position_ids, **loss_options)
        if loss_options:
            raise TypeError(f"loss options {sorted(loss_options)} need labels")
        return self.output(self.hidden_states(input_ids, position_ids=position_ids))

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        ignore_index: int = -100,
        num_tokens: int | torch.Tensor | None = None,
        **ce_options,
    ) -> torch.Tensor:
        """Mean cross-entropy of predicting ``labels`` (batch, seq), already shifted: ``labels[:, t]`` is the
        token after ``input_ids[:, t]``, as :class:`ember.data.TokenLoader` yields them.

        The output layer and the loss run fused (:func:`ember.kernels.fused_linear_cross_entropy`),
        so the full logits are never held. ``num_tokens`` replaces the count of non-ignored
        labels as the denominator; ``ce_options`` are the other cross-entropy options
        (``label_smoothing``, ``z_loss``, ``softcap``, ``chunk_size``).
        """
        h = self.hidden_states(input_ids, position_ids=position_ids)
        return fused_linear_cross_entropy(
            h.flatten(0, 1),
            self.output.weight,
            labels.flatten(),
            ignore_index=ignore_index,
            num_tokens=num_tokens,
            **ce_options,
        )

    # -- weights ----------------------------------------------------------------

    def init_weights(self, seed: int | None = None) -> None:
        """Fresh weights, and the RoPE tables rebuilt on the parameters' device.

        Linear and embedding weights are normal(0, initializer_range), except the residual
        projections (``wo``, ``w2``) whose std is divided by ``sqrt(2 * num_hidden_layers)``
        (GPT-2's scaling) so the residual stream's variance does not grow with depth; norm
        weights are 1. ``seed`` makes the result reproducible on a given device type without
        touching the global random state.
        """
        self._tie_weights()
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        # Names as in the state dict: wrappers (activation checkpointing) must not change the values.
        names = {id(p): n.replace("_checkpoint_wrapped_module.", "") for n, p in self.named_parameters()}

        def normal(weight: torch.Tensor, std: float) -> None:
            _init_normal(weight, std, seed, names[id(weight)])

        normal(self.tok_embeddings.weight, std)
        for layer in self.layers:
            attention, ffn = layer.attention, layer.feed_forward
            for linear in (attention.wq, attention.wk, attention.wv, ffn.w1, ffn.w3):
                normal(linear.weight, std)
            for linear in (attention.wo, ffn.w2):
                normal(linear.weight, residual_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.config.tie_word_embeddings:
            normal(self.output.weight, std)
        self.reset_rope()

    def reset_rope(self) -> None:
        """Recomputes the RoPE tables (float32) on the device of the parameters."""
        self.rope_cos, self.rope_sin = rope_cos_sin(self.config, self.tok_embeddings.weight.device)

    def to_empty(self, *, device, recurse: bool = True) -> Llama:
        """``nn.Module.to_empty``, then re-tied embeddings and real RoPE tables.

        Moving off the meta device gives every parameter new storage, which unties a tied
        output layer; and the RoPE buffers are not in any checkpoint, so they are rebuilt
        here rather than left as garbage for a model that is loaded, not initialised.
        """
        super().to_empty(device=device, recurse=recurse)
        self._tie_weights()
        self.reset_rope()
        return self

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameters, a tied matrix counted once; see :func:`ember.model.config.num_params`."""
        total = sum(p.numel() for p in self.parameters())
        if include_embedding or self.config.tie_word_embeddings:
            return total
        return total - self.tok_embeddings.weight.numel()

    # -- sampling ---------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``input_ids`` (batch, seq) followed by ``max_new_tokens`` sampled tokens.

        Samples from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
        tokens; ``temperature=0`` picks the most likely token. Without a KV cache each step
        reruns the whole (at most ``max_position_embeddings``-token) context.
        """
        was_training = self.training
        self.eval()
        try:
            ids = input_ids
            for _ in range(max_new_tokens):
                context = ids[:, -self.config.max_position_embeddings :]
                logits = self.output(self.hidden_states(context)[:, -1]).float()
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    next_id = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
                ids = torch.cat((ids, next_id), dim=1)
            return ids
        finally:
            self.train(was_training)


def _init_normal(weight: torch.Tensor, std: float, seed: int | None, name: str) -> None:
    """normal(0, std) into ``weight``. With a seed, each parameter draws from its own
    generator, seeded from the seed and its name, and a sharded parameter (DTensor)
    receives its slice of the very tensor an unsharded one would get: the values do
    not depend on how the model is wrapped or sharded, or on the order of the calls."""
    with torch.no_grad():
        if seed is None:
            nn.init.normal_(weight, std=std)
            return
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        gen = torch.Generator(device=local.device).manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))
        full = torch.empty(weight.shape, dtype=local.dtype, device=local.device).normal_(0.0, std, generator=gen)
        if isinstance(weight, DTensor):
            full = distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None).to_local()
        local.copy_(full)
