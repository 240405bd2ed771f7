"""The Llama model, its presets, and Hugging Face checkpoint import and export.

::

    from ember.model import Llama, LlamaConfig

    config = LlamaConfig.from_preset("llama3.2-1b", max_position_embeddings=4096)
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device="cuda")
    model.init_weights(seed=0)
    loss = model(input_ids, labels)
"""

from .checkpointing import apply_activation_checkpointing
from .config import PRESETS, LlamaConfig, flops_per_token, num_params
from .llama import Llama

__all__ = ["PRESETS", "Llama", "LlamaConfig", "apply_activation_checkpointing", "flops_per_token", "num_params"]
