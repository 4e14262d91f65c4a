"""W8A8 prefill: int8 (``torch._int_mm``) and FP8 (``torch._scaled_mm``, row-wise) packed layers vs bf16, in one run.

GPU (targets of issue 25: int8 >= 1.3x, FP8 >= 1.6x over bf16):
    PYTHONPATH=. python bench/bench_w8a8.py --device cuda
times the seven linear layers of one Llama-3-8B decoder layer (q 4096->4096, k/v 4096->1024, o 4096->4096,
gate/up 4096->14336, down 14336->4096) on a prefill batch of 16 x 512 tokens (bf16 activations): bf16 ``F.linear``
vs hfqat's packed W8A8 layers as `save_packed` reloads them (`PackedLinear` with ``activation_bits=8``: backend
``w8a8_int8``; `PackedFP8Linear`: backend ``fp8_scaled_mm``). Each W8A8 time includes the dynamic per-token
activation quantization (vLLM's quantizers, the ones hfqat trains with; the backends run it as one fused kernel),
also with the whole layer under ``torch.compile``, and the bare GEMM without it for reference. Also prints
each variant's error against the bf16 output of the same (dequantized) weights.

CPU smoke mode (small shapes, checks that every path runs; the CPU times mean nothing for the GPU targets):
    PYTHONPATH=. python bench/bench_w8a8.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hfqat.config import QATConfig
from hfqat.export.packed import PackedLinear
from hfqat.export.w8a8 import PackedFP8Linear
from hfqat.quant.fp8 import FP8Linear
from hfqat.quant.primitives import quantize_activations_fp8, quantize_activations_int8

LLAMA3_8B_LAYERS = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                    "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
SMOKE_LAYERS = {"q_proj": (256, 256), "k_proj": (256, 64), "gate_proj": (256, 512), "down_proj": (512, 256)}


def median_ms_timer(device: str, warmup: int, iters: int):
    """``measure(fn)``: median milliseconds of ``iters`` calls after ``warmup`` (CUDA events on CUDA)."""
    def measure(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return measure


def _layers(k: int, n: int, device: str):
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    int8 = PackedLinear.from_float(linear, 8, -1, True, scale_init="minmax")
    int8.activation_bits = 8  # as save_packed writes a QATConfig(bits=8, group_size=-1, activation_bits=8) layer
    qc = QATConfig(weight_format="fp8", activation_bits=8)
    fp8_qat = FP8Linear.from_float(linear, qc.spec_for("layer", k))
    fp8_qat.reset_quant_params()
    fp8 = PackedFP8Linear.from_qat(fp8_qat)
    dense = linear.weight.detach().to(torch.bfloat16)
    return dense, int8, fp8  # bf16 biases/activations; scales stay fp32 as a reloaded model keeps them


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=None, help="default 16 (cuda) / 2 (cpu)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (cuda) / 32 (cpu)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU; use --device cpu for the smoke mode")
    batch, seq = args.batch or (16 if cuda else 2), args.seq or (512 if cuda else 32)
    shapes = LLAMA3_8B_LAYERS if cuda else SMOKE_LAYERS
    measure = median_ms_timer(args.device, warmup=5 if cuda else 1, iters=args.iters if cuda else 3)
    compile_ok = not args.no_compile and cuda
    print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"tokens {batch}x{seq}, layers {list(shapes)}")
    totals: dict[str, float] = {}
    errors: dict[str, list[float]] = {}
    for name, (k, n) in shapes.items():
        dense, int8, fp8 = _layers(k, n, args.device)
        x = torch.randn(batch * seq, k, device=args.device, dtype=torch.bfloat16)
        ref = F.linear(x, dense)
        variants = {
            "bf16": lambda: F.linear(x, dense),
            "int8 W8A8": lambda: int8(x),
            "fp8 W8A8": lambda: fp8(x),
        }
        int8(x), fp8(x)  # pick the backends (and build their buffers) outside the timing
        backends = {"int8": int8.backend, "fp8": fp8.backend}
        if compile_ok:
            variants["int8 W8A8 (layer compiled)"] = torch.compile(lambda: int8(x))
            variants["fp8 W8A8 (layer compiled)"] = torch.compile(lambda: fp8(x))
        if int8.backend == "w8a8_int8":  # the bare GEMMs: what a fused quantizer would leave
            qi, _ = quantize_activations_int8(x)
            w_i = int8._w8a8_weight.t()
            variants["int8 GEMM only"] = lambda: torch._int_mm(qi, w_i)
        if fp8.backend == "fp8_scaled_mm":
            qf, sf = quantize_activations_fp8(x)
            w_f, s_w = fp8._fp8_weight.t(), fp8._fp8_scale
            variants["fp8 GEMM only"] = lambda: torch._scaled_mm(qf, w_f, scale_a=sf, scale_b=s_w,
                                                                 out_dtype=torch.bfloat16)
        row = {}
        for label, fn in variants.items():
            ms = measure(fn)
            row[label] = ms
            totals[label] = totals.get(label, 0.0) + ms
        errors.setdefault("int8", []).append(_rel(int8(x), F.linear(x, int8.dequantized_weight(torch.bfloat16))))
        errors.setdefault("fp8", []).append(_rel(fp8(x), F.linear(x, fp8.dequantized_weight(torch.bfloat16))))
        errors.setdefault("int8 vs float weights", []).append(_rel(int8(x), ref))
        print(f"{name:10s} {k:6d}->{n:<6d} backends {backends} " +
              " | ".join(f"{label} {ms:.3f} ms" for label, ms in row.items()))
    base = totals["bf16"]
    print("\n# one decoder layer's linears (sum of medians), speed-up over bf16")
    for label, ms in totals.items():
        print(f"{label:24s} {ms:8.3f} ms  x{base / ms:.2f}")
    print("\n# relative error vs bf16 with the dequantized weights (activation quantization only), max over layers")
    print(json.dumps({key: round(max(values), 5) for key, values in errors.items()}))
    if cuda:
        best = {fmt: max(base / totals[label] for label in totals if label.startswith(fmt) and "GEMM" not in label)
                for fmt in ("int8", "fp8")}
        print(f"\n# targets: int8 >= 1.3x: {best['int8']:.2f}x {'met' if best['int8'] >= 1.3 else 'NOT met'}; "
              f"fp8 >= 1.6x: {best['fp8']:.2f}x {'met' if best['fp8'] >= 1.6 else 'NOT met'}")


if __name__ == "__main__":
    main()
