"""The RMSNorm, rotary and SwiGLU kernels together, as a transformer block chains them: one
torch.compile graph, forward and backward, and (on a GPU) Inductor and CUDA graph replay.
Each op's own tests are in tests/test_kernel_<op>.py; see kernel_fixtures.py."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import apply_rotary, rms_norm, swiglu
from kernel_fixtures import f32, needs_cuda, on_triton, outputs_and_grads, randn, rope_tables  # tests/ is on sys.path

pytestmark = on_triton


def transformer_block(x, h, norm_weight, gate_weight, cos, sin):
    normed, h = rms_norm(x, norm_weight, 1e-5, residual=h)
    batch, seq, _ = normed.shape
    q, k = apply_rotary(normed.view(batch, seq, -1, 8), (2 * normed).view(batch, seq, -1, 8)[:, :, :1], cos, sin)
    k2, _ = apply_rotary(3 * k, 2 * q, cos, sin, inplace=True)
    return swiglu(normed * gate_weight, normed) + q.flatten(2) + k2.flatten(2).sum(-1, keepdim=True) + h


def block_inputs(gen, dtype=f32, batch=2, seq=5, dim=32):
    return (
        randn(gen, batch, seq, dim, dtype=dtype),
        randn(gen, batch, seq, dim, dtype=dtype),
        randn(gen, dim, dtype=dtype),
        randn(gen, dim, dtype=dtype),
        *rope_tables(seq, 8),
    )


def assert_compiled_matches_eager(gen, backend, dtype=f32, **tol):
    torch._dynamo.reset()
    inputs = block_inputs(gen, dtype)
    upstream = randn(gen, *inputs[0].shape, dtype=dtype, requires_grad=False)
    compiled = torch.compile(transformer_block, fullgraph=True, backend=backend)
    want = outputs_and_grads(transformer_block, inputs, [upstream])
    got = outputs_and_grads(compiled, inputs, [upstream])
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, **tol)


def test_compiles_into_one_graph(gen):
    # aot_eager traces forward and backward through the fake implementations without
    # generating code; the gpu test below runs Inductor.
    assert_compiled_matches_eager(gen, "aot_eager", rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_compiles_with_inductor(gen):
    assert_compiled_matches_eager(gen, "inductor", torch.bfloat16, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_forward_and_backward(gen):
    inputs = block_inputs(gen, torch.bfloat16, batch=4, seq=64, dim=256)
    upstream = randn(gen, 4, 64, 256, dtype=torch.bfloat16, requires_grad=False)
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        return torch.autograd.grad(transformer_block(*inputs), leaves, upstream)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in leaves:
            t.copy_(randn(gen, *t.shape, dtype=t.dtype, requires_grad=False))
    graph.replay()
    for g, w in zip(captured, step()):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
