"""Bytes of packed linear weights (codes + scales + zero points) vs bf16, per bit width, in one run.

    PYTHONPATH=. python bench/bench_size.py [--smollm2]

Layer set: the linear layers of an 8B Llama (32 layers of q/k/v/o 4096→4096/1024/1024/4096, gate/up
4096→14336, down 14336→4096; lm_head stays bf16 and is not counted). Sizes come from
`hfqat.export.packing.packed_nbytes`, checked against real `PackedLinear` tensors for one layer of each shape.
With ``--smollm2`` it also packs the real SmolLM2-135M (group 64: 576 is not a multiple of 128) with
`save_packed` and reports the on-disk checkpoint size.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from hfqat.export.packed import PackedLinear
from hfqat.export.packing import packed_nbytes

LLAMA_8B_LAYER = {  # name: (out_features, in_features), per decoder layer
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}
N_LAYERS = 32
SETTINGS = ((4, 128, True), (4, 128, False), (3, 128, True), (2, 128, True), (8, -1, True), (4, -1, True))


def _check_against_real_layers(bits: int, group_size: int, symmetric: bool) -> None:
    for out_features, in_features in set(LLAMA_8B_LAYER.values()):
        layer = PackedLinear.from_float(torch.nn.Linear(in_features, out_features, bias=False), bits, group_size,
                                        symmetric, scale_init="minmax")
        real = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        group = in_features if group_size == -1 else group_size
        assert real == packed_nbytes(out_features, in_features, bits, group, symmetric), (out_features, in_features)


def llama_8b_table() -> float:
    bf16 = N_LAYERS * sum(2 * o * i for o, i in LLAMA_8B_LAYER.values())
    print(f"8B-Llama linear layers (lm_head excluded): bf16 {bf16 / 1e9:.3f} GB")
    ratio_w4g128 = 0.0
    for bits, group_size, symmetric in SETTINGS:
        packed = N_LAYERS * sum(packed_nbytes(o, i, bits, i if group_size == -1 else group_size, symmetric)
                                for o, i in LLAMA_8B_LAYER.values())
        ratio = bf16 / packed
        label = f"W{bits} {'g' + str(group_size) if group_size > 0 else 'per-channel'} {'sym' if symmetric else 'asym'}"
        print(f"  {label:22s} {packed / 1e9:6.3f} GB  {8 * packed / (bf16 / 2):5.3f} bits/weight  "
              f"x{ratio:.2f} smaller than bf16")
        if (bits, group_size, symmetric) == (4, 128, True):
            ratio_w4g128 = ratio
    _check_against_real_layers(4, 128, True)
    _check_against_real_layers(3, 128, False)
    print("  (formula checked against real PackedLinear tensors for every layer shape)")
    return ratio_w4g128


def smollm2(group_size: int = 64) -> None:
    import hfqat
    from hfqat.export.packed import save_packed
    from hfqat.integrations.gguf import embedded_smollm2, load_gguf_for_qat
    from hfqat.quant.modeling import qat_layers

    model, _ = load_gguf_for_qat(embedded_smollm2(), hfqat.QATConfig(bits=4, group_size=group_size,
                                                                      scale_init="minmax"), "/tmp/smollm2_f32")
    bf16 = sum(2 * layer.weight.numel() for _, layer in qat_layers(model))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_packed(model.eval(), os.path.join(tmp, "packed"))
        from safetensors.torch import load_file

        tensors = load_file(str(path / "model.safetensors"))
        packed = sum(t.numel() * t.element_size() for k, t in tensors.items()
                     if k.endswith((".qweight", ".scales", ".zeros")))
        disk = os.path.getsize(path / "model.safetensors")
    print(f"SmolLM2-135M W4 g{group_size}: linear weights bf16 {bf16 / 1e6:.1f} MB -> packed {packed / 1e6:.1f} MB "
          f"(x{bf16 / packed:.2f}); whole checkpoint on disk {disk / 1e6:.1f} MB (embeddings stay float)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true")
    args = parser.parse_args()
    ratio = llama_8b_table()
    print(f"W4 g128 (symmetric, hfqat default): x{ratio:.2f} fewer bytes than bf16 (target >= 3.6): "
          f"{'PASS' if ratio >= 3.6 else 'FAIL'}")
    if args.smollm2:
        smollm2()
    print("command: PYTHONPATH=. python bench/bench_size.py" + (" --smollm2" if args.smollm2 else ""))


if __name__ == "__main__":
    main()
