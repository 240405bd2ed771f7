"""Rotary embedding tables, with Llama 3.1's long-context frequency scaling."""

from __future__ import annotations

import math

import torch

from .config import LlamaConfig


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float64 on the CPU, scaled as ``config.rope_scaling`` says.

    Llama 3 scaling (Hugging Face's ``_compute_llama3_parameters``): wavelengths shorter than
    ``original_max_position_embeddings / high_freq_factor`` keep their frequency, those longer
    than ``original / low_freq_factor`` are divided by ``factor``, and the ones between blend
    the two linearly in ``original / wavelength``.
    """
    dim = config.head_size
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    is_medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(config: LlamaConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables (max_position_embeddings, head_dim) in float32, angles repeated twice.

    The angles ``position * inv_freq`` are formed in float64: in float32 they would be off by
    up to ~1e-2 radians at position 131072. On the meta device only the shapes are made.
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    shape = (config.max_position_embeddings, config.head_size)
    if device.type == "meta":
        return torch.empty(shape, device=device), torch.empty(shape, device=device)
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float64)
    angles = torch.outer(positions, rope_inv_freq(config))
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device, torch.float32), angles.sin().to(device, torch.float32)
