"""The installed package: native module present, metadata consistent, tests run against the wheel in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import ember
import ember._native as native

REPO = Path(__file__).resolve().parents[1]


def test_native_module_loads_with_the_package_version():
    assert native.__version__ == ember.__version__
    for name in ("ShardWriter", "Dataset", "Loader", "ShardFormatError"):
        assert hasattr(native, name)
    assert issubclass(native.ShardFormatError, ValueError)


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="developers may test an editable install")
def test_ci_tests_the_installed_wheel_not_the_source_tree():
    assert REPO / "python" not in Path(ember.__file__).resolve().parents
    assert Path(native.__file__).resolve().parent == Path(ember.__file__).resolve().parent
