"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["kernel_fixtures"]  # gen, triton_backend


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A cache directory holding the built-in corpus, tokenized once per test session."""
    from ember.data.builtin import stdlib_shards

    cache = tmp_path_factory.mktemp("cache")
    stdlib_shards(cache)
    return cache
