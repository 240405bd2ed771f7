"""``python/ember/_native.pyi`` against the compiled module: the stub declares exactly
what ``ember._native`` exports, each member as the kind of thing it is, each class
with its bases, each function with the parameters the module accepts, and each
property and variable with the type of the value it gives."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

import ember
from ember import _native
from ember.data import ShardWriter

STUB = Path(ember.__file__).with_name("_native.pyi")
TREE = ast.parse(STUB.read_text(encoding="utf-8"))
CLASSES = {node.name: node for node in TREE.body if isinstance(node, ast.ClassDef)}
FUNCTIONS = {node.name: node for node in TREE.body if isinstance(node, ast.FunctionDef)}
VARIABLES = {node.target.id: node.annotation for node in TREE.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


class Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# A required parameter (or *args, **kwargs), and a default a signature does not
# spell out: the stub writes `...`, and so does the module's text signature for a
# default that is not a simple literal.
REQUIRED = Marker("<required>")
SOME_DEFAULT = Marker("<some default>")


def members(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}


def decorators(fn: ast.FunctionDef) -> set[str]:
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


def properties(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {name: fn for name, fn in members(cls).items() if "property" in decorators(fn)}


def stub_default(node: ast.expr | None) -> object:
    if node is None:
        return REQUIRED
    if isinstance(node, ast.Constant) and node.value is ...:
        return SOME_DEFAULT
    return ast.literal_eval(node)


def stub_parameters(fn: ast.FunctionDef, *, method: bool) -> list[tuple[str, str, object]]:
    """(name, kind, default) per parameter, in `inspect.Parameter` terms; `self` left out."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = [
        (arg.arg, "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD", stub_default(d))
        for i, (arg, d) in enumerate(zip(positional, defaults))
    ]
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", REQUIRED))
    out += [(arg.arg, "KEYWORD_ONLY", stub_default(d)) for arg, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", REQUIRED))
    if method and "staticmethod" not in decorators(fn):
        out = out[1:]
    return out


def runtime_parameters(obj) -> list[tuple[str, str, object]]:
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [
        (p.name, p.kind.name, REQUIRED if p.default is inspect.Parameter.empty else SOME_DEFAULT if p.default is ... else p.default)
        for p in params
    ]


def assert_same_parameters(declared, actual, where):
    assert [(n, k) for n, k, _ in declared] == [(n, k) for n, k, _ in actual], f"{where}: parameter names or kinds differ"
    for (name, _, d), (_, _, a) in zip(declared, actual):
        assert (d is REQUIRED) == (a is REQUIRED), f"{where}: {name} has a default in {'the module' if d is REQUIRED else 'the stub'} only"
        if d is REQUIRED or d is SOME_DEFAULT:
            continue
        assert a is not SOME_DEFAULT, f"{where}: the module does not spell out {name}'s default; the stub writes it as `...`"
        # `type` too: False == 0 and 1 == 1.0, but a stub that says so is wrong.
        assert (type(d), d) == (type(a), a), f"{where}: default of {name}"


def test_stub_declares_every_public_name_and_nothing_else():
    exported = {name for name in dir(_native) if not name.startswith("_")} | {"__version__"}
    declared = set(CLASSES) | set(FUNCTIONS) | set(VARIABLES)
    assert declared == exported
    assert set(_native.__all__) <= declared


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_each_class_declares_its_members_as_what_they_are(name):
    cls = getattr(_native, name)
    assert isinstance(cls, type)
    declared_bases = [ast.unparse(b).rpartition(".")[2] for b in CLASSES[name].bases] or ["object"]
    assert declared_bases == [b.__name__ for b in cls.__bases__], f"{name}: declared bases differ from the class's"
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


# -- types of values ---------------------------------------------------------

NAMED_TYPES = {
    "int": int,
    "str": str,
    "float": float,
    "bool": bool,
    "bytes": bytes,
    "list": list,
    "tuple": tuple,
    "dict": dict,
    "Path": Path,
    "npt.NDArray": np.ndarray,
}


def conforms(value, annotation: ast.expr) -> bool:
    """Whether `value` is of the stub's type `annotation`: names, `X | None` and other
    unions, and `list[X]` item by item; other generics (`tuple[...]`, `dict[...]`,
    `npt.NDArray[...]`) only at the outer level, their items or dtype unchecked."""
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return conforms(value, annotation.left) or conforms(value, annotation.right)
    if isinstance(annotation, ast.Constant) and annotation.value is None:
        return value is None
    if isinstance(annotation, ast.Subscript):
        if ast.unparse(annotation.value) == "list":
            return isinstance(value, list) and all(conforms(v, annotation.slice) for v in value)
        return conforms(value, annotation.value)
    name = ast.unparse(annotation)
    cls = NAMED_TYPES.get(name) or getattr(_native, name, None)
    assert isinstance(cls, type), f"the stub names type {name}, which this test does not know"
    # isinstance counts a bool as an int; the stub does not.
    return isinstance(value, cls) and (cls is bool or not isinstance(value, bool))


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """Instances of every class that has properties, built from a tiny shard; where a
    property may be None, one instance for each case."""
    tmp = tmp_path_factory.mktemp("native")
    shard = tmp / "shard"
    with ShardWriter(shard, 1000) as w:
        for doc in ([1, 2, 3], [4, 5], list(range(6, 40))):
            w.add_document(doc)
    open_writer = _native.ShardWriter(tmp / "unfinished", 1000)  # only an open writer answers every property
    open_writer.add_document_bytes(np.arange(3, dtype="<i8").tobytes())
    dataset = _native.Dataset([shard])
    B, L = 2, 4
    full = _native.BatchBuffers(
        np.zeros((B, L), np.int64),
        np.zeros((B, L), np.int64),
        position_ids=np.zeros((B, L), np.int64),
        cu_seqlens=np.zeros(B * L + 1, np.int32),
    )
    bare = _native.BatchBuffers(np.zeros((B, L), np.int64), np.zeros((B, L), np.int64))
    sequential = _native.Loader([([shard], 1.0)], L, B, shuffle=False)
    shuffled = _native.Loader([([shard], 1.0)], L, B)  # num_batches is None
    planned = sequential.submit([full, bare])
    filled = [sequential.wait(p.ticket) for p in planned]
    gpt2 = dict(_native.SUPPORTED_PRETOKENIZER_PATTERNS)["gpt2"]
    encoder = _native.BpeEncoder([(bytes([b]), b) for b in range(256)], [], gpt2, added=["<|end|>"])
    yield {
        "ShardWriter": [open_writer],
        "Dataset": [dataset],
        "ShardInfo": dataset.shards(),
        "DocLocation": [dataset.doc_location(i) for i in range(3)],
        "BatchBuffers": [full, bare],
        "Loader": [sequential, shuffled],
        "PlannedBatch": planned,
        "FilledBatch": filled,
        "EncodedBatch": [encoder.encode_batch(["hello there", "hi<|end|>"])],  # the second is deferred
    }
    open_writer.abort()


@pytest.mark.parametrize("name", sorted(name for name, cls in CLASSES.items() if properties(cls)))
def test_each_property_gives_the_declared_type(name, instances):
    assert instances.get(name), f"{name} has properties: build an instance of it in the `instances` fixture"
    for obj in instances[name]:
        assert type(obj) is getattr(_native, name)
        for member, fn in properties(CLASSES[name]).items():
            value = getattr(obj, member)
            assert conforms(value, fn.returns), f"{name}.{member} gives {type(value).__name__}, declared {ast.unparse(fn.returns)}"


@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_each_variable_has_the_declared_type(name):
    value = getattr(_native, name)
    assert conforms(value, VARIABLES[name]), f"{name} is {type(value).__name__}, declared {ast.unparse(VARIABLES[name])}"


def test_the_stub_ships_beside_the_module():
    assert Path(_native.__file__).parent == STUB.parent
    assert STUB.parent.joinpath("py.typed").is_file()
