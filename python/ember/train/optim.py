"""AdamW with weight decay on matrices only.

Decay pulls weights towards zero, which is a useful prior for the matrices of linear layers and
embeddings but not for the gains of norm layers (whose natural value is 1) or for biases, so
parameters with two or more dimensions decay and the rest do not.
"""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters in two groups, each dict carrying a ``"name"``:

    - ``"decay"``: parameters with ``ndim >= 2`` (linear and embedding weights), ``weight_decay``;
    - ``"no_decay"``: parameters with ``ndim < 2`` (norm weights, biases), weight decay 0.

    A group with no parameters is left out. Tied parameters (one ``nn.Parameter`` reachable
    under two names, e.g. input embedding and output head) are optimised once.
    ``fused=None`` picks the fused CUDA kernel when every parameter is on CUDA and
    PyTorch's default implementation otherwise; ``True`` or ``False`` is passed through.
    """
    decay, no_decay = [], []
    # parameters() yields each Parameter object once, which is what de-duplicates ties.
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no parameters with requires_grad=True to optimise")
    groups = [
        {"name": name, "params": params, "weight_decay": wd}
        for name, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0))
        if params
    ]
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay) or None
    kwargs = {} if fused is None else {"fused": fused}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
