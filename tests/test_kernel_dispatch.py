"""ember.kernels' backend choice (``EMBER_KERNELS``, the tensor's device, whether Triton is
installed) and the guard every op's Triton path passes before launching."""

from __future__ import annotations

import importlib
import re
from types import SimpleNamespace

import pytest
import torch

import ember.kernels as K
from ember.kernels import apply_rotary, cross_entropy, fused_linear_cross_entropy, rms_norm, swiglu
from ember.kernels._triton import interpreter_requested

dispatch = importlib.import_module("ember.kernels._dispatch")


def _ops():
    x = torch.randn(2, 4)
    table = torch.ones(4, 4)
    return {
        "rms_norm": lambda: rms_norm(x, torch.ones(4)),
        "swiglu": lambda: swiglu(x, x),
        "apply_rotary": lambda: apply_rotary(x.view(1, 2, 1, 4), x.view(1, 2, 1, 4), table, table),
        "cross_entropy": lambda: cross_entropy(x, torch.tensor([0, 1])),
        "fused_linear_cross_entropy": lambda: fused_linear_cross_entropy(x, torch.randn(3, 4), torch.tensor([0, 1])),
    }


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("EMBER_KERNELS", raising=False)
    assert K.backend_for(torch.ones(1)) == "torch"
    for call in _ops().values():
        call()


def test_forced_torch_backend(monkeypatch):
    monkeypatch.setenv("EMBER_KERNELS", "torch")
    assert K.backend_for(torch.ones(1)) == "torch"
    for call in _ops().values():
        call()


def test_unknown_backend_is_rejected_naming_the_variable(monkeypatch):
    monkeypatch.setenv("EMBER_KERNELS", "bogus")
    with pytest.raises(ValueError, match="EMBER_KERNELS"):
        rms_norm(torch.ones(2, 4), torch.ones(4))


def test_cuda_tensors_take_the_reference_where_triton_is_missing(monkeypatch):
    monkeypatch.delenv("EMBER_KERNELS", raising=False)
    cuda_tensor = SimpleNamespace(is_cuda=True)  # the rule needs only the flag; this machine may have no GPU
    monkeypatch.setattr(dispatch, "triton", object())
    assert K.backend_for(cuda_tensor) == "triton"
    monkeypatch.setattr(dispatch, "triton", None)
    assert K.backend_for(cuda_tensor) == "torch"


@pytest.mark.parametrize("op", list(_ops()))
def test_forced_triton_on_cpu_without_the_interpreter_raises_naming_the_op(monkeypatch, op):
    # Every op's inputs here are float32, which its kernels cover: the guard, not a fallback
    # to the reference, decides. An op that skipped the guard would reach the launch and fail
    # there with a RuntimeError instead.
    pytest.importorskip("triton")
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = (
        f"EMBER_KERNELS=triton, but ember.kernels.{op} cannot run its Triton kernel on cpu tensors outside "
        "Triton's interpreter; use CUDA tensors, set TRITON_INTERPRET=1"
    )
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        _ops()[op]()


@pytest.mark.parametrize("op", list(_ops()))
def test_forced_triton_without_triton_installed_raises_naming_the_op(monkeypatch, op):
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "triton", None)
    message = f"EMBER_KERNELS=triton, but Triton is not installed (it ships for Linux only), so ember.kernels.{op} "
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        _ops()[op]()


def test_forced_triton_runs_the_triton_path(monkeypatch):
    # The package's rms_norm attribute is the function; the file is reached through importlib.
    module = importlib.import_module("ember.kernels.rms_norm")
    calls = []
    monkeypatch.setattr(module, "_rms_norm_triton", lambda *a, **kw: calls.append(kw) or "triton result")
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    assert rms_norm(torch.ones(2, 4), torch.ones(4), casting="gemma") == "triton result"
    assert calls == [{"offset": 0.0, "casting": "gemma"}]
    monkeypatch.setenv("EMBER_KERNELS", "torch")
    assert isinstance(rms_norm(torch.ones(2, 4), torch.ones(4)), torch.Tensor)


# The spellings of TRITON_INTERPRET that turn the interpreter on, as Triton's own parser reads
# them (case-insensitive, nothing stripped), and some that do not.
INTERPRETER_ON = ["1", "true", "TRUE", "on", "On", "yes", "y", "Y"]
INTERPRETER_OFF = ["", "0", "false", "off", "no", "2", " 1", "1 "]


@pytest.mark.parametrize("value", INTERPRETER_ON + INTERPRETER_OFF)
def test_triton_interpret_spellings(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_requested() is (value in INTERPRETER_ON)


@pytest.mark.parametrize("value", ["yes", "TRUE", "0", "off"])
def test_the_guard_reads_triton_interpret_as_the_launch_does(monkeypatch, value):
    pytest.importorskip("triton")
    swiglu_module = importlib.import_module("ember.kernels.swiglu")
    launches = []
    launch = swiglu_module.launch
    monkeypatch.setattr(swiglu_module, "launch", lambda *a, **kw: launches.append(a[0]) or launch(*a, **kw))
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    if value in INTERPRETER_ON:
        torch.testing.assert_close(swiglu(gate, up), K.swiglu_reference(gate, up))
        assert launches  # the kernel ran, in the interpreter
    else:
        with pytest.raises(NotImplementedError, match=r"ember\.kernels\.swiglu .*TRITON_INTERPRET=1"):
            swiglu(gate, up)
        assert not launches
