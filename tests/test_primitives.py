"""Exact numerics of the quantizer primitives."""

import math

import pytest
import torch

from hfqat.quant.primitives import (
    MSE_SHRINK_GRID,
    SCALE_EPS,
    dequantize,
    fake_quantize,
    fake_quantize_activations,
    init_scales,
    int_range,
    quantize,
    soft_clamp,
    soft_round,
)


def _weight(out=16, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, 64])
def test_fake_quant_equals_quantize_dequantize_exactly(bits, symmetric, group_size):
    w = _weight()
    scale, zero = init_scales(w, bits, group_size, symmetric)
    q = quantize(w, scale, zero, bits, group_size)
    qmin, qmax = int_range(bits, symmetric)
    assert q.min() >= qmin and q.max() <= qmax and torch.equal(q, q.round())
    assert torch.equal(fake_quantize(w, scale, zero, bits, group_size), dequantize(q, scale, zero, group_size))
    # every group uses at most 2^bits distinct values
    levels = dequantize(q, scale, zero, group_size).reshape(16, -1, group_size)
    assert max(len(torch.unique(g)) for g in levels.reshape(-1, group_size)) <= 2**bits


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_one_bit_width_per_group(symmetric, device):
    """bits as an (out, groups, 1) tensor: every group is quantized, and gets gradients, exactly as at its width
    (on CUDA: uniform widths take the fused kernels, per-group ones the unfused path)."""
    w0 = _weight(8, 64, seed=2).to(device)
    per_group = torch.randint(2, 5, (8, 4, 1), generator=torch.Generator().manual_seed(1)).to(device)
    s0, z0 = init_scales(w0, 4, 16, symmetric, "minmax")
    grad = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)).to(device)

    def run(bits):
        w, s = w0.clone().requires_grad_(), (s0 * 0.8).requires_grad_()
        out = fake_quantize(w, s, z0, bits, 16)
        (out * grad).sum().backward()
        return out.reshape(8, 4, 16), w.grad.reshape(8, 4, 16), s.grad

    mixed = run(per_group)
    for b in (2, 3, 4):
        at_b, where = run(b), per_group.squeeze(-1) == b
        for m, u in zip(mixed, at_b):  # exact on CPU; on CUDA fused vs unfused sums may differ in the last bits
            torch.testing.assert_close(m[where], u[where], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_range_init_is_torchaos_grid(bits):
    # symmetric: max|w| / ((qmax - qmin) / 2), e.g. / 7.5 at 4 bits; asymmetric: the min-max scale and zero point
    w = _weight(8, 64, seed=2)
    amax = w.abs().reshape(8, 4, 16).amax(-1)
    scale, zero = init_scales(w, bits, 16, True, "range")
    assert zero is None
    torch.testing.assert_close(scale, amax / ((2**bits - 1) / 2), rtol=1e-6, atol=0)
    for got, want in zip(init_scales(w, bits, 16, False, "range"), init_scales(w, bits, 16, False, "minmax")):
        assert torch.equal(got, want)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["minmax", "mse", "range"])
def test_init_scales_takes_one_width_per_row(symmetric, method):
    w = _weight(12, 64, seed=5)
    per_row = torch.tensor([2, 3, 4, 8] * 3)
    scale, zero = init_scales(w, per_row, 16, symmetric, method)
    for b in (2, 3, 4, 8):
        rows = per_row == b
        s, z = init_scales(w[rows], b, 16, symmetric, method)
        torch.testing.assert_close(scale[rows], s, rtol=0, atol=0)
        if not symmetric:
            torch.testing.assert_close(zero[rows], z, rtol=0, atol=0)


def _mse_search_by_definition(w, bits, group_size, symmetric):
    """The MSE scale search as defined: each shrink of the min-max range through dequantize(quantize(...)), the first
    smallest group error kept."""
    wg = w.float().reshape(w.shape[0], -1, group_size)
    per_row = isinstance(bits, torch.Tensor)
    grid_bits = bits.reshape(-1, 1, 1) if per_row else bits
    qmin, qmax = int_range(grid_bits, symmetric)
    qmin, qmax = (qmin.reshape(-1, 1), qmax.reshape(-1, 1)) if per_row else (float(qmin), float(qmax))
    best = None
    for shrink in MSE_SHRINK_GRID:
        if symmetric:
            scale, zero = (wg.abs().amax(-1) * shrink / qmax).clamp_min(SCALE_EPS), None
        else:
            lo, hi = wg.amin(-1).clamp(max=0) * shrink, wg.amax(-1).clamp(min=0) * shrink
            scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
            zero = torch.clamp(torch.round(-lo / scale), qmin, qmax)
        q = quantize(w.float(), scale, zero, grid_bits, group_size)
        err = (dequantize(q, scale, zero, group_size) - w.float()).reshape(wg.shape).pow(2).sum(-1)
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                None if zero is None else torch.where(better, zero, best[2])]
    return best[1], best[2]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_init_is_the_search_by_definition_bit_for_bit(symmetric, bits, dtype):
    w = (torch.randn(24, 256, generator=torch.Generator().manual_seed(7)) * 0.05).to(dtype)
    w[3, 17], w[5, :32] = 1.5, 0.0  # an outlier and an all-zero group
    bits = torch.tensor([2, 3, 4, 8] * 6) if bits == "rows" else bits
    scale, zero = init_scales(w, bits, 32, symmetric, "mse")
    expected_scale, expected_zero = _mse_search_by_definition(w, bits, 32, symmetric)
    assert torch.equal(scale, expected_scale)
    assert zero is None if symmetric else torch.equal(zero, expected_zero)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_init_beats_minmax(symmetric):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))  # gaussian: outliers make clipping pay
    errs = {}
    for method in ("minmax", "mse"):
        s, z = init_scales(w, 3, 64, symmetric, method)
        errs[method] = (fake_quantize(w, s, z, 3, 64) - w).pow(2).sum()
    assert errs["mse"] < errs["minmax"]


def test_ste_gradients_are_lsq():
    w = torch.tensor([[0.26, -0.74, 3.0, 0.1]], requires_grad=True)
    s = torch.tensor([[0.5]], requires_grad=True)
    fake_quantize(w, s, None, 3, 4).sum().backward()
    # w: identity inside the range, zero where clamped (3.0/0.5 = 6 > qmax = 3)
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    # s: sum of (round(x) - x) inside the range plus qmax where clamped (LSQ)
    x = torch.tensor([0.52, -1.48, 0.2])
    expected = (torch.round(x) - x).sum() + 3
    assert torch.allclose(s.grad, expected.reshape(1, 1))


def test_soft_round_and_clamp_converge_to_exact():
    x = torch.linspace(-5, 5, 1001)
    away = x[((x - x.floor()) - 0.5).abs() > 0.05]  # round() itself jumps at half-integers
    errs = [(soft_round(away, a) - torch.round(away)).abs().max().item() for a in (1.0, 10.0, 1000.0)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6
    assert torch.allclose(soft_round(x, 1e-3), x, atol=1e-3)  # → identity as α → 0
    lo, hi = torch.tensor(-2.0), torch.tensor(1.0)
    assert (soft_clamp(x, lo, hi, 200.0) - x.clamp(-2, 1)).abs().max() < 0.01
    # soft is continuous: no jumps between neighbouring points
    assert soft_round(x, 10.0).diff().abs().max() < 0.1


def test_soft_fake_quant_differs_in_training_and_matches_when_annealed():
    w = _weight()
    s, z = init_scales(w, 4, 64, False)
    exact = fake_quantize(w, s, z, 4, 64)
    soft = fake_quantize(w, s, z, 4, 64, rounding="soft", clamping="soft", sharpness=2.0)
    sharp = fake_quantize(w, s, z, 4, 64, rounding="soft", clamping="soft", sharpness=1e4)
    assert not torch.allclose(soft, exact)
    assert torch.allclose(sharp, exact, atol=1e-6)
    assert torch.equal(fake_quantize(w, s, z, 4, 64, "soft", "soft", math.inf), exact)


def test_activation_fake_quant_per_token():
    x = torch.randn(2, 5, 32)
    xq = fake_quantize_activations(x, 8)
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(xq / scale, (xq / scale).round(), atol=1e-4)
    assert (xq - x).abs().max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_ste_gradients_match_autograd_reference(symmetric):
    from hfqat.quant.primitives import effective_scale, round_ste

    w0 = _weight(8, 32, seed=5) * 3
    s0, z0 = init_scales(w0, 3, 16, symmetric, "minmax")
    s0 = s0 * 0.7  # force some clamping
    leaves = lambda: [t.clone().requires_grad_() for t in (w0, s0) + ((z0,) if z0 is not None else ())]  # noqa: E731
    fused, ref = leaves(), leaves()
    g = torch.randn(8, 32, generator=torch.Generator().manual_seed(9))
    (fake_quantize(fused[0], fused[1], fused[2] if not symmetric else None, 3, 16) * g).sum().backward()

    w, s, z = ref[0], ref[1], (ref[2] if not symmetric else None)
    qmin, qmax = int_range(3, symmetric)
    x = w.reshape(8, 2, 16) / effective_scale(s).unsqueeze(-1)
    q = round_ste(x)
    if z is not None:
        q = q + round_ste(z).unsqueeze(-1)
    q = torch.clamp(q, qmin, qmax)
    if z is not None:
        q = q - round_ste(z).unsqueeze(-1)
    ((q * effective_scale(s).unsqueeze(-1)).reshape(8, 32) * g).sum().backward()
    for a, b in zip(fused, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), (a.grad - b.grad).abs().max()
