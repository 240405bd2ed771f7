"""Prints the versions the GPU check runs with and writes them to ENV_JSON; exits 1 when Ember
(with its compiled extension) cannot be imported, since every later phase needs it.

Usage: python3 benchmarks/gpu/versions.py ENV_JSON
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(out: str) -> int:
    env: dict = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine()}
    try:
        import torch

        env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(
                device=torch.cuda.get_device_name(0),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                memory_gb=round(props.total_memory / 1e9, 1),
                sm_count=props.multi_processor_count,
                bf16=torch.cuda.is_bf16_supported(),
            )
        else:
            env["device"] = "cpu"
    except ImportError as e:
        env["torch"] = f"not importable: {e}"
    for dist in ("triton", "transformers", "pytest", "pytest-benchmark", "numpy", "liger-kernel", "deepspeed"):
        env[dist] = _version(dist)
    ok = True
    try:
        ember = importlib.import_module("ember")
        importlib.import_module("ember._native")
        env.update(ember=ember.__version__, ember_path=ember.__file__)
    except ImportError as e:
        ok = False
        env["ember"] = f"not importable: {e}"
    for key, value in env.items():
        print(f"{key:<18} {value if value is not None else 'not installed'}")
    with open(out, "w") as f:
        json.dump(env, f, indent=1)
    if not ok:
        print(
            "ERROR: Ember with its compiled extension (ember._native) is not importable. The source tree's python/ "
            "has no compiled module: put Ember's abi3 wheel in .whl/ (maturin build --release -o .whl) and rerun.",
            file=sys.stderr,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
