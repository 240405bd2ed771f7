"""Ember: pretraining and continual pretraining of Llama-family language models.

Subpackages are imported on use, so ``import ember`` and ``ember --help`` stay
fast and do not load torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ember-llm")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
