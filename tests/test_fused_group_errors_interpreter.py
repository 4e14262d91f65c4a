"""The fused per-group error kernel of `hfqat.quant.fused_group_errors`, run on the CPU by Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess), against the torch code it replaces on CUDA.

Its group sums are those of the dense (quantizers, out, in) errors (symmetric and with zero points, weighted or not,
rounded to the weight's dtype or not); the clip search and the Fisher weighing through it give the torch path's clip
ratios and costs; and a whole run of re-allocations (calibration on, budget binding) takes the same decisions: the
same widths, clip ratios and measured losses at every re-allocation, the same predicted costs within float noise.
"""

import textwrap

import pytest
from triton_interpreter import run_in_interpreter

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(r'''
    import torch
    from hfqat.quant import fused_group_errors as G
    from hfqat.quant import primitives as P

    torch.manual_seed(0)
    out_features, in_features, group = 12, 64, 16
    # float16, not bfloat16: the interpreter casts to bfloat16 by truncation (the GPU rounds, as torch does)
    for dtype in (torch.float32, torch.float16):
        w = (torch.randn(out_features, in_features) * 0.05).to(dtype)
        fisher = torch.rand(out_features, in_features)
        for symmetric in (True, False):
            bits, rounded = (2, 3, 4, 8), (0, 1, 0, 0)
            fits = [P.init_scales(w, b, group, symmetric, "minmax") for b in bits]
            scale = torch.stack([s * c for (s, _), c in zip(fits, (0.7, 1.0, 0.9, 0.8))])
            zero = None if symmetric else torch.stack([z + 0.3 for _, z in fits])  # a float zero point: rounded
            for weight in (None, fisher):
                sums = G.group_error_sums(w, scale, zero, torch.tensor(bits, dtype=torch.int32),
                                          torch.tensor(rounded, dtype=torch.int32), group, weight)
                for k, b in enumerate(bits):
                    z = None if zero is None else zero[k]
                    value = P.dequantize(P.quantize(w, scale[k], z, b, group), scale[k], z, group)
                    value = value.to(dtype).float() if rounded[k] else value
                    error = (value - w.float()).pow(2) * (1.0 if weight is None else weight)
                    expected = error.view(out_features, -1, group).sum(-1)
                    torch.testing.assert_close(sums[k], expected, rtol=1e-5, atol=1e-12,
                                               msg=str((dtype, symmetric, b, weight is None)))

    import hfqat
    from transformers import AutoModelForCausalLM, LlamaConfig
    from hfqat.quant.modeling import qat_layers, quantize_model
    from hfqat.train import candidates as S
    from hfqat.train.arguments import CallbackArguments
    from hfqat.train.reallocation import Reallocation
    from hfqat.train.schedule import Schedule

    def fused(on):
        G.supports = (lambda *a: True) if on else supports

    def run():
        """A run with re-allocations every 4 steps: each one's (widths, measured, predicted) and clip ratios."""
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1)
        model = AutoModelForCausalLM.from_config(config)
        quantize_model(model, hfqat.QATConfig(bits=4, group_size=16))
        data = [{"input_ids": r, "labels": r.clone()} for r in torch.randint(0, 64, (16, 12))]
        loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=torch.utils.data.default_collate)
        settings = CallbackArguments(teacher=None, budget_bits=3.0, bit_choices=(2, 3, 4, 8), reallocate_every=4,
                                     hysteresis=0.0)
        run = Reallocation(model, settings, Schedule.for_run(4, 1.0, 12), dataloader=loader)
        run.start(0)
        clips = [dict(run.tracker.clip)]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for done, batch in zip(range(12), list(loader) * 3):
            run.before_step(done)
            model.zero_grad()
            model(**batch).loss.backward()
            run.before_optimizer_step(done, batch)
            optimizer.step()
            if run.after_step(done + 1, batch):
                clips.append(dict(run.tracker.clip))
        return run.history.entries, clips, model

    supports = G.supports
    expected, expected_clips, model = run()
    for name, layer in qat_layers(model):  # the clip search and the Fisher weighing, layer by layer
        totals = S.clip_error_totals(layer, (2, 3, 4, 8))
        fused(True)
        torch.testing.assert_close(S.clip_error_totals(layer, (2, 3, 4, 8)), totals, rtol=1e-5, atol=0)
        fisher, clip = torch.rand_like(layer.weight), S.fit_clip_ratios(layer, (2, 3, 4, 8))
        sums = S.weighted_error_sums(layer, (2, 3, 4, 8), clip, layer.bits, fisher)
        fused(False)
        dense = (S.quantization_errors(layer, (2, 3, 4, 8), clip) * fisher).sum((1, 2))
        torch.testing.assert_close(sums.sum((1, 2)), dense, rtol=1e-5, atol=0)
    fused(True)
    entries, clips, _ = run()
    fused(False)
    assert len(entries) == len(expected) == 4 and clips == expected_clips
    assert len({str(e["bits"]) for e in expected}) > 1  # the budget moves widths: decisions are exercised
    for got, want in zip(entries, expected):
        assert got["bits"] == want["bits"], got["step"]
        assert got["measured_kind_loss_increase"] == want["measured_kind_loss_increase"], got["step"]
        predicted, reference = got["predicted_loss_increase"], want["predicted_loss_increase"]
        assert (predicted is None) == (reference is None)
        if reference is not None:
            assert abs(predicted - reference) <= 1e-5 * abs(reference), got["step"]
    print("fused group errors ok")
''')


def test_fused_group_errors_match_the_torch_code_in_the_interpreter():
    proc = run_in_interpreter(SCRIPT)
    assert proc.returncode == 0 and "fused group errors ok" in proc.stdout, proc.stderr[-4000:]
