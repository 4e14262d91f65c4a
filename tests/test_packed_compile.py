"""Packed layers trace into one graph (``torch.compile(fullgraph=True)``) once their backend is prepared, as
transformers' static-cache ``generate`` compiles them: no graph break from the backend choice, no ``.item()``,
no data-dependent shapes. CPU, ``aot_eager`` (the trace is what is checked, not inductor's code)."""

import pytest
import torch
from packed_layers import random_rows_layer

from hfqat.export.packed import PackedLinear, prepare_backends, set_backend

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows_layer(k=128, counts=None):
    return random_rows_layer(k, counts or {3: 24, 4: 16, 5: 24}, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int4", "int3", "rows"])
def test_prepared_packed_layers_compile_without_graph_breaks(kind, dtype):
    torch.manual_seed(0)
    if kind == "rows":
        layer = _rows_layer()
    else:
        layer = PackedLinear.from_float(torch.nn.Linear(128, 64), 4 if kind == "int4" else 3, 32, True)
    layer.bias.data = layer.bias.data.to(dtype)  # scales stay fp32, as a loaded checkpoint keeps them
    model = torch.nn.Sequential(layer)
    chosen = prepare_backends(model, dtype)
    assert all(chosen.values())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for m in (1, 5):
        x = torch.randn(2, m, 128, dtype=dtype)
        with torch.no_grad():
            expected = model(x)
            got = compiled(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        reference = x.double() @ layer.dequantized_weight().double().t() + layer.bias.double()
        assert ((got.double() - reference).norm() / reference.norm()) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("kind", ["int4", "rows"])
def test_set_backend_sets_prepared_layers_up_again_before_compile(kind):
    # A backend pinned (or unpinned) after the first forward: the next compile must not meet the set-up.
    torch.manual_seed(0)
    layer = _rows_layer() if kind == "rows" else PackedLinear.from_float(torch.nn.Linear(128, 64), 4, 32, True)
    model = torch.nn.Sequential(layer)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        expected = model(x)
    for backend in ("dequant", None):
        set_backend(model, backend)
        assert layer._prepared_key == (x.device, x.dtype, backend)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
