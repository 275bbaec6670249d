"""torch.compile of every encoder family (issue 24): one graph, no graph break (fullgraph=True), forward and
backward equal to eager; and one real inductor compile of the smallest model.

The graph checks use the aot_eager backend: dynamo and AOT autograd trace exactly what inductor would get (the
forward and the backward graph) but no code is generated, so each family costs seconds on 2 cores. Inductor
itself compiles one model's forward, its caches (TORCHINDUCTOR_CACHE_DIR) kept in a temporary folder across runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import ENCODER_FAMILIES, tiny_encoder
from sslkit.models.base import set_activation_checkpointing


def _loss(feats: list[torch.Tensor]) -> torch.Tensor:
    return sum(f.float().square().mean() for f in feats)


def _forward_backward(model, x: torch.Tensor, run=None):
    """Stage outputs and parameter gradients of one forward + backward of `run` (default: the model itself)."""
    model.zero_grad(set_to_none=True)
    out = (model if run is None else run)(x)
    _loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads


def _assert_same(got, want, atol=1e-5, rtol=1e-4):
    (out, grads), (ref_out, ref_grads) = got, want
    assert len(out) == len(ref_out)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol, msg=name)


def _compile_and_compare(enc, shape) -> CompileCounterWithBackend:
    x = torch.randn(shape)
    enc.train()
    eager = _forward_backward(enc, x)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(enc, fullgraph=True, backend=counter)  # fullgraph: a graph break raises
    _assert_same(_forward_backward(enc, x, compiled), eager)
    return counter


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_compiles_to_one_graph_equal_to_eager(family, one_thread):
    enc, shape = tiny_encoder(family)
    if family == "swin_unetr_3d":  # activation checkpointing (MONAI's, per block) inside the graph too
        assert set_activation_checkpointing(enc) > 0
    counter = _compile_and_compare(enc, shape)
    assert counter.frame_count == 1  # one frame traced, no recompilation
    assert counter.op_count > 50  # the whole encoder is in it, not a stub


@pytest.fixture
def inductor_cache(monkeypatch) -> Path:
    """Inductor's caches in a temporary folder that outlives the session: later runs skip code generation."""
    cache = Path(tempfile.gettempdir()) / "sslkit-inductor-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    return cache


def test_inductor_compiles_the_smallest_encoder(inductor_cache, one_thread):
    """Inductor's generated code (inference graph: forward only, to keep a cold compile short) gives eager's
    stage maps."""
    enc, shape = tiny_encoder("vit_3d")
    x = torch.randn(shape)
    enc.eval()
    torch._dynamo.reset()
    compiled = torch.compile(enc, fullgraph=True)  # inductor, the default backend
    with torch.no_grad():
        got, want = compiled(x), enc(x)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert any(inductor_cache.iterdir())
