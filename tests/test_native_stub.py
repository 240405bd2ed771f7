"""``python/ember/_native.pyi`` against the compiled module: the stub declares exactly
what ``ember._native`` exports, each member as the kind of thing it is, and each
function with the parameters the module accepts."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import ember
from ember import _native

STUB = Path(ember.__file__).with_name("_native.pyi")
TREE = ast.parse(STUB.read_text(encoding="utf-8"))
CLASSES = {node.name: node for node in TREE.body if isinstance(node, ast.ClassDef)}
FUNCTIONS = {node.name: node for node in TREE.body if isinstance(node, ast.FunctionDef)}
VARIABLES = {node.target.id for node in TREE.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
UNSET = object()


def members(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}


def decorators(fn: ast.FunctionDef) -> set[str]:
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


def stub_parameters(fn: ast.FunctionDef, *, method: bool) -> list[tuple[str, str, object]]:
    """(name, kind, default) per parameter; `self` left out; UNSET where the stub writes `...`."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [UNSET] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = []
    for arg, default in zip(positional, defaults):
        out.append((arg.arg, "POSITIONAL_ONLY" if arg in a.posonlyargs else "POSITIONAL_OR_KEYWORD", default))
    out += [(arg.arg, "KEYWORD_ONLY", d if d is not None else UNSET) for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if method and "staticmethod" not in decorators(fn):
        out = out[1:]
    return [(name, kind, UNSET if d is UNSET or (isinstance(d, ast.Constant) and d.value is ...) else ast.literal_eval(d)) for name, kind, d in out]


def runtime_parameters(obj) -> list[tuple[str, str, object]]:
    params = [p for p in inspect.signature(obj).parameters.values() if p.name != "self"]
    return [(p.name, p.kind.name, UNSET if p.default in (inspect.Parameter.empty, ...) else p.default) for p in params]


def assert_same_parameters(declared, actual, where):
    assert [(n, k) for n, k, _ in declared] == [(n, k) for n, k, _ in actual], where
    for (name, _, d), (_, _, a) in zip(declared, actual):
        if d is not UNSET and a is not UNSET:
            assert d == a, f"{where}: default of {name}"


def test_stub_declares_every_public_name_and_nothing_else():
    exported = {name for name in dir(_native) if not name.startswith("_")} | {"__version__"}
    declared = set(CLASSES) | set(FUNCTIONS) | VARIABLES
    assert declared == exported
    assert set(_native.__all__) <= declared


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_class_declares_its_members_as_what_they_are(name):
    cls = getattr(_native, name)
    assert isinstance(cls, type)
    for base in CLASSES[name].bases:
        assert ast.unparse(base) in {b.__name__ for b in cls.__mro__}, f"{name} does not derive from {ast.unparse(base)}"
    declared = members(CLASSES[name])
    actual = {k: v for k, v in vars(cls).items() if not k.startswith("_")}
    assert {k for k in declared if not k.startswith("_")} == set(actual), name
    for member, fn in declared.items():
        if member == "__init__":
            continue
        kind = type(actual[member]).__name__
        if "property" in decorators(fn):
            assert kind in {"getset_descriptor", "member_descriptor"}, f"{name}.{member} is a {kind}, declared a property"
        elif "staticmethod" in decorators(fn):
            assert kind == "staticmethod", f"{name}.{member} is a {kind}, declared a staticmethod"
        else:
            assert kind == "method_descriptor", f"{name}.{member} is a {kind}, declared a method"
            assert_same_parameters(stub_parameters(fn, method=True), runtime_parameters(actual[member]), f"{name}.{member}")
        if kind == "staticmethod":
            assert_same_parameters(stub_parameters(fn, method=True), runtime_parameters(getattr(cls, member)), f"{name}.{member}")
    # A class Python may construct declares __init__, with the constructor's parameters.
    if issubclass(cls, BaseException):
        return
    assert ("__init__" in declared) == ("__new__" in vars(cls)), f"{name}: __init__ declared but not constructible, or the reverse"
    if "__init__" in declared:
        assert_same_parameters(stub_parameters(declared["__init__"], method=True), runtime_parameters(cls), f"{name}()")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_each_function_takes_the_declared_parameters(name):
    assert_same_parameters(stub_parameters(FUNCTIONS[name], method=False), runtime_parameters(getattr(_native, name)), name)


def test_the_stub_ships_beside_the_module():
    assert Path(_native.__file__).parent == STUB.parent
    assert STUB.parent.joinpath("py.typed").is_file()
