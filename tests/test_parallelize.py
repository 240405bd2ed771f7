"""ember.model.parallelize: the one order in which a plain model becomes the trained one."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from ember.model import Llama, LlamaConfig
from ember.model.parallelize import ParallelPlan, parallelize


def meta_model() -> Llama:
    with torch.device("meta"):
        return Llama(LlamaConfig.from_preset("tiny"))


def test_checkpointing_then_compile_then_dtype_then_the_strategys_sharding():
    model = meta_model()
    seen = {}

    def shard(m):  # what a strategy's sharding receives: the blocks as they will run
        seen["blocks"] = [type(b) for b in m.layers]
        seen["compiled"] = [b._compiled_call_impl is not None for b in m.layers]
        seen["dtypes"] = {p.dtype for p in m.parameters()}

    plan = ParallelPlan(activation_checkpointing="full", compile=True, param_dtype=torch.bfloat16)
    assert parallelize(model, plan, shard=shard) is model
    n = len(model.layers)
    # Checkpointing wraps each block and compile then compiles the wrapper, so the
    # recomputation is inside the compiled region.
    assert seen["blocks"] == [CheckpointWrapper] * n
    assert seen["compiled"] == [True] * n
    assert seen["dtypes"] == {torch.bfloat16}


def test_selective_checkpointing_and_an_empty_plan():
    model = meta_model()
    parallelize(model, ParallelPlan(activation_checkpointing="selective"))
    assert [isinstance(b, CheckpointWrapper) for b in model.layers] == [i % 2 == 0 for i in range(len(model.layers))]
    plain = meta_model()
    parallelize(plain, ParallelPlan())
    assert not any(isinstance(b, CheckpointWrapper) for b in plain.layers)
    assert all(b._compiled_call_impl is None for b in plain.layers)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
