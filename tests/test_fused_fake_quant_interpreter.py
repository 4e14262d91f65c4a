"""The fused fake-quant kernels of `hfqat.quant.fused_fake_quant`, run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess: the variable must be set before the kernels are defined).

Forward bit for bit ``dequantize(quantize(w))``, and the backward's STE mask and LSQ / zero-point gradients those of the
torch code, with one width for the weight, one per output row (``bits_granularity="row"``) and one per group;
symmetric and with zero points. And the sensitivity estimators' candidate grids (`hfqat.train.candidates._grid_weights`,
which run them on CUDA): the weights of their torch code, hence the same calibration ΔL table (`measure_kinds`) on a
tiny model. The GPU test in test_compile.py covers the compiled kernels.
"""

import textwrap

import pytest
from triton_interpreter import run_in_interpreter

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(r'''
    import torch
    from hfqat.quant import fused_fake_quant as F
    from hfqat.quant import primitives as P

    torch.manual_seed(0)
    out_features, in_features, group = 12, 64, 16
    widths = {"layer": torch.tensor(3), "row": torch.tensor([2, 3, 4, 8] * 3).view(-1, 1, 1),
              "group": torch.randint(2, 9, (out_features, in_features // group, 1))}
    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(out_features, in_features) * 0.05).to(dtype)
        for symmetric in (True, False):
            for name, bits in widths.items():
                scale, zero = P.init_scales(w, bits.view(-1) if name == "row" else 4, group, symmetric, "minmax")
                scale = scale * 0.8  # some clamping
                zero = zero + 0.3 if zero is not None else None  # a float zero point: its rounding must match
                what = (dtype, symmetric, name)
                # float32 out: the interpreter casts to bfloat16 by truncation (the GPU rounds, test_compile.py)
                ref = P.dequantize(P.quantize(w, scale, zero, bits, group), scale, zero, group)
                assert torch.equal(F.forward(w, scale, zero, bits, group, torch.float32), ref), what
                grad = torch.linspace(-1, 1, w.numel()).reshape(w.shape).to(dtype)
                leaves = [t.clone().requires_grad_() for t in (w, scale) + ((zero,) if zero is not None else ())]
                P.fake_quantize(leaves[0], leaves[1], leaves[2] if zero is not None else None, bits, group,
                                out_dtype=torch.float32).backward(grad.float())
                grad_w, grad_s, grad_z = F.backward(w, scale, zero, bits, group, grad)
                assert torch.equal(grad_w, leaves[0].grad), what
                torch.testing.assert_close(grad_s, leaves[1].grad, rtol=1e-4, atol=1e-6, msg=str(what))
                if zero is not None:
                    torch.testing.assert_close(grad_z, leaves[2].grad, rtol=1e-4, atol=1e-6, msg=str(what))

    from hfqat.train import candidates as S

    for dtype in (torch.float32, torch.bfloat16):
        w = (torch.randn(out_features, in_features) * 0.05).to(dtype)
        for symmetric in (True, False):
            args = (w, (2, 3, 4, 8), (0.7, 0.8, 1.0, 0.9), group, symmetric)
            expected = S._grid_weights(*args)  # CPU tensors: the torch code
            supports, F.supports = F.supports, lambda *a: True  # the fused path, run on the CPU
            try:
                assert torch.equal(S._grid_weights(*args), expected), (dtype, symmetric)
            finally:
                F.supports = supports

    import hfqat
    from transformers import AutoModelForCausalLM, LlamaConfig
    from hfqat.quant.modeling import bit_allocation, qat_layers, quantize_model
    from hfqat.train.calibration import measure_kinds

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    quantize_model(model, hfqat.QATConfig(bits=4, group_size=16))
    layers, ids = list(qat_layers(model)), torch.randint(0, 64, (2, 12))
    clip = {name: S.fit_clip_ratios(layer, (2, 3, 4, 8)) for name, layer in layers}
    table = lambda: measure_kinds(model, layers, {"input_ids": ids}, (2, 3, 4, 8), clip, bit_allocation(model))
    expected = table()
    supports, F.supports = F.supports, lambda *a: True
    try:
        assert table() == expected
    finally:
        F.supports = supports
    print("fused fake quant ok")
''')


def test_fused_kernels_match_the_torch_code_in_the_interpreter():
    proc = run_in_interpreter(SCRIPT)
    assert proc.returncode == 0 and "fused fake quant ok" in proc.stdout, proc.stderr[-4000:]
