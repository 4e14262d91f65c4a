"""Random packed layers for kernel and compile tests (no QAT model needed)."""

import torch

from hfqat.export.packed import PackedLinear, PackedRowsLinear


def random_rows_layer(in_features: int, counts: dict[int, int], group_size: int) -> PackedRowsLinear:
    """A per-row mixed layer: ``counts[b]`` rows at ``b`` bits (min-max fits of random weights), a random output
    order and a random bias."""
    n = sum(counts.values())
    rows = PackedRowsLinear(in_features, n, True, counts, group_size, True)
    rows.parts = torch.nn.ModuleList(
        PackedLinear.from_float(torch.nn.Linear(in_features, c, bias=False), b, group_size, True, scale_init="minmax")
        for b, c in sorted(counts.items()))
    rows.output_order.copy_(torch.randperm(n).to(torch.int32))
    rows.bias.data.normal_()
    return rows


def random_experts(in_features: int, out_features: int, widths: list[int], group_size: int,
                   symmetric: bool) -> list[PackedLinear]:
    """One packed matrix per expert (no bias) at ``widths[e]`` bits: min-max fits of random weights."""
    return [PackedLinear.from_float(torch.nn.Linear(in_features, out_features, bias=False), b, group_size, symmetric,
                                    scale_init="minmax") for b in widths]
