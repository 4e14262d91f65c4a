"""Bit packing: exact round trips for every width, dense sizes, the documented layout, and packed layers that
rebuild exactly the fake-quantized weight."""

import pytest
import torch
import torch.nn as nn

from hfqat.config import QATConfig
from hfqat.export.packed import PackedLinear
from hfqat.export.packing import pack, packed_nbytes, packed_rows, planes, unpack
from hfqat.quant.layers import QATLinear


def _codes(n, k, bits, seed=0):
    return torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("in_features", [32, 96, 100, 7])
def test_unpack_inverts_pack(bits, in_features):
    codes = _codes(12, in_features, bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_rows(in_features, bits), 12)
    assert torch.equal(unpack(packed, bits, in_features), codes)


def test_extreme_codes_survive_the_sign_bit():
    for bits in (1, 2, 4, 8):
        codes = torch.full((3, 64), (1 << bits) - 1, dtype=torch.int32)  # all ones: top word bit set
        assert torch.equal(unpack(pack(codes, bits), bits, 64), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_packing_is_dense(bits):
    # every width takes exactly `bits` bits per code (3-bit included: no padding inside words)
    assert packed_rows(4096, bits) * 32 == 4096 * bits


def test_plane_split_and_layout():
    assert planes(3) == (2, 1) and planes(7) == (4, 2, 1) and planes(4) == (4,)
    codes = torch.arange(32, dtype=torch.int32).remainder(8).view(1, 32)
    packed = pack(codes, 3)
    # 2-bit plane: input k at row k // 16, bit 2·(k % 16); 1-bit plane (rows after it): bit k of one word
    low = sum(((k % 8) & 3) << (2 * (k % 16)) for k in range(16))
    high = sum((((k % 8) >> 2) & 1) << k for k in range(32))
    assert int(packed[0, 0]) & 0xFFFFFFFF == low
    assert int(packed[2, 0]) & 0xFFFFFFFF == high


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(torch.full((2, 32), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits"):
        planes(9)


def _qat_linear(bits, symmetric, group_size, in_features=64, out_features=24, seed=0):
    torch.manual_seed(seed)
    cfg = QATConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    layer = QATLinear.from_float(nn.Linear(in_features, out_features), cfg.spec_for("layer", in_features))
    layer.reset_quant_params()
    with torch.no_grad():  # training moves scales and zero points off their init: pack what training leaves
        layer.weight_scale.mul_(1 + 0.1 * torch.rand_like(layer.weight_scale))
        if layer.weight_zero_point is not None:
            layer.weight_zero_point.add_(torch.rand_like(layer.weight_zero_point) - 0.5)
    return layer.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_packed_weight_equals_fake_quant_weight_exactly(bits, symmetric, group_size):
    layer = _qat_linear(bits, symmetric, group_size)
    packed = PackedLinear.from_qat(layer)
    torch.testing.assert_close(packed.dequantized_weight(), layer.quantized_weight(exact=True), atol=0, rtol=0)
    x = torch.randn(5, 64)
    packed.force_backend = "dequant"
    torch.testing.assert_close(packed(x), layer(x), atol=0, rtol=0)


def test_packed_layer_holds_integers_only():
    packed = PackedLinear.from_qat(_qat_linear(4, False, 32))
    floats = {name for name, t in packed.state_dict().items() if t.is_floating_point()}
    assert floats == {"scales", "bias"}
    assert packed.qweight.dtype == torch.int32 and packed.zeros.dtype == torch.int16


def test_packed_nbytes_matches_the_layer():
    for symmetric in (True, False):
        packed = PackedLinear.from_qat(_qat_linear(3, symmetric, 32))
        stored = sum(t.numel() * t.element_size() for name, t in packed.state_dict().items() if name != "bias")
        assert stored == packed_nbytes(24, 64, 3, 32, symmetric)
