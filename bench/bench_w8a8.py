"""W8A8 prefill: every int8 and FP8 path of hfqat's packed W8A8 layers vs bf16, side by side in one run.

GPU (targets of issue 25: int8 >= 1.3x, FP8 >= 1.6x over bf16):
    PYTHONPATH=. python bench/bench_w8a8.py --device cuda [--calls 10] [--layers q_proj,gate_proj] [--no-compile]
times the seven linear layers of one Llama-3-8B decoder layer (q 4096->4096, k/v 4096->1024, o 4096->4096, gate/up
4096->14336, down 14336->4096) on a prefill batch of 16 x 512 tokens (bf16 activations), as `save_packed` reloads
them (`PackedLinear` with ``activation_bits=8``; `PackedFP8Linear`), and prints one table: a row per variant, a
column per layer, the decoder layer's sum and its speed-up over bf16. ``TRITON_PRINT_AUTOTUNING=1`` also prints the
int8 GEMM's tile choice per shape (tuned on the first call of each shape, outside the timing).

- whole layers (activation quantization included): bf16 ``F.linear``; int8 ``w8a8_int8`` (``torch._int_mm`` + a
  rescale pass) with the old quantizer (torch's, compiled by inductor on its own) and with our one-pass Triton
  quantizer; int8 ``w8a8_triton`` (our GEMM, rescale fused in the epilogue, Triton quantizer); torchao's
  ``int_scaled_matmul`` where torchao is importable (Triton quantizer; cuBLAS int_mm + scale unless
  TORCHAO_AUTOTUNER_ENABLE=1 selects its Triton kernel, whose exhaustive search takes a long first call; eager, its
  ``safe_int_mm`` formats the input's repr on every call, so its compiled row is the fair one); FP8
  ``torch._scaled_mm`` with the old and the new quantizer. Then under ``torch.compile``: the two old paths (session
  10's compiled rows), the fused int8 layer, torchao, the FP8 layer.
- parts: each GEMM alone (codes given) and each quantizer alone.

Also prints each format's error against the bf16 output of the same (dequantized) weights, and whether the two int8
GEMMs agree bit for bit. Which int8 backend a layer picks on CUDA is the order in `hfqat.export.kernels.AUTO_ORDER`,
its activation quantizer `hfqat.export.kernels.w8a8.CUDA_QUANTIZER`: set them from this table.

CPU smoke mode (small shapes, eager layers only; the CPU times mean nothing for the GPU targets):
    PYTHONPATH=. python bench/bench_w8a8.py --device cpu
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hfqat.config import QATConfig
from hfqat.export.kernels import AUTO_ORDER, w8a8
from hfqat.export.packed import PackedLinear
from hfqat.export.w8a8 import PackedFP8Linear
from hfqat.quant.fp8 import FP8Linear

LLAMA3_8B_LAYERS = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
                    "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
SMOKE_LAYERS = {"q_proj": (256, 256), "k_proj": (256, 64), "gate_proj": (256, 512), "down_proj": (512, 256)}
PART_MARKS = ("GEMM only", "quant only")  # rows that are not whole layers (left out of the targets)


def median_ms_timer(device: str, warmup: int, iters: int, calls: int = 1):
    """``measure(fn)``: median milliseconds per call of ``iters`` timings after ``warmup`` calls (CUDA events on
    CUDA). Each timing spans `calls` back-to-back calls: with more than one, the host's launch overhead overlaps
    the GPU's work as in a model's forward, instead of counting in full before the first kernel."""
    def measure(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / calls)
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


def _torchao_int_scaled_matmul():
    """torchao's ``int_scaled_matmul`` (a, b (K, N), scales1 (M, 1)) → (M, N) in scales1's dtype, or None."""
    try:
        from torchao.kernel.intmm import int_scaled_matmul
    except ImportError:
        return None
    return int_scaled_matmul


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _with_backend(layer, backend: str):
    copy_ = copy.deepcopy(layer)
    copy_.force_backend = backend
    return copy_


def cuda_layers(x: torch.Tensor, dense: torch.Tensor, int8, fp8) -> dict:
    """The packed layers of each CUDA path, backends picked (buffers built, the Triton GEMM autotuned) on `x`."""
    layers = {"bf16": functools.partial(F.linear, weight=dense),
              "int8 int_mm+rescale": _with_backend(int8, "w8a8_int8"),
              "int8 fused triton": _with_backend(int8, "w8a8_triton"), "fp8 scaled_mm": fp8}
    for label, backend in (("int8 int_mm+rescale", "w8a8_int8"), ("int8 fused triton", "w8a8_triton"),
                           ("fp8 scaled_mm", "fp8_scaled_mm")):
        layers[label](x)
        assert layers[label].backend == backend, (label, layers[label].backend)
    return layers


def cuda_variants(x: torch.Tensor, layers: dict, compile_ok: bool) -> dict:
    """label → callable: every W8A8 path on CUDA, for one layer (`cuda_layers`) on activations `x`."""
    from hfqat.export.kernels import triton_w8a8  # CUDA machines only (needs triton)

    int_mm_layer, fused_layer, fp8 = layers["int8 int_mm+rescale"], layers["int8 fused triton"], layers["fp8 scaled_mm"]
    dt = x.dtype
    # pieces for the composed variants (what a layer with another quantizer would run)
    int_mm_old = lambda: w8a8.int_mm_gemm(int_mm_layer, *w8a8.quantize(x, "int", "inductor"), dt)  # noqa: E731
    int_mm_new = lambda: w8a8.int_mm_gemm(int_mm_layer, *w8a8.quantize(x, "int", "triton"), dt)  # noqa: E731
    fp8_old = lambda: w8a8.fp8_gemm(fp8, *w8a8.quantize(x, "fp8", "inductor"), dt)  # noqa: E731
    variants = {
        "bf16": lambda: layers["bf16"](x),
        "int8 int_mm+rescale, inductor quant": int_mm_old,
        "int8 int_mm+rescale, triton quant": int_mm_new,
        "int8 fused triton (layer)": lambda: fused_layer(x),
    }
    qi, si = w8a8.quantize(x, "int", "triton")
    qf, sf = w8a8.quantize(x, "fp8", "triton")
    torchao_mm = _torchao_int_scaled_matmul()
    if torchao_mm is not None:
        # torchao's usage: row scales in the activation dtype, the weight scale after; its weight (K, N)
        # contiguous (torchao copies a transposed view on every call)
        w_kn = int_mm_layer._w8a8_weight.t().contiguous()
        w_scale, si_dt = int_mm_layer._w8a8_scale.to(dt), si.to(dt)

        def torchao_layer():
            q, scale = w8a8.quantize(x, "int", "triton")
            return torchao_mm(q, w_kn, scale.to(dt)) * w_scale

        variants["int8 torchao int_scaled_matmul, triton quant"] = torchao_layer
    variants["fp8 scaled_mm, inductor quant"] = fp8_old
    variants["fp8 scaled_mm, triton quant (layer)"] = lambda: fp8(x)
    if compile_ok:
        variants["int8 int_mm+rescale, inductor quant (compiled)"] = torch.compile(int_mm_old)
        variants["int8 fused triton (layer compiled)"] = torch.compile(lambda: fused_layer(x))
        if torchao_mm is not None:
            variants["int8 torchao int_scaled_matmul, triton quant (compiled)"] = torch.compile(torchao_layer)
        variants["fp8 scaled_mm, inductor quant (compiled)"] = torch.compile(fp8_old)
        variants["fp8 scaled_mm, triton quant (layer compiled)"] = torch.compile(lambda: fp8(x))
    variants["int8 int_mm GEMM only (int32 out)"] = lambda: torch._int_mm(qi, int_mm_layer._w8a8_weight.t())
    variants["int8 int_mm+rescale GEMM only"] = lambda: w8a8.int_mm_gemm(int_mm_layer, qi, si, dt)
    for schedule in triton_w8a8.MM_CONFIGS:  # the layer runs triton_w8a8.GEMM_SCHEDULE
        variants[f"int8 fused triton GEMM only ({schedule})"] = lambda schedule=schedule: triton_w8a8.int8_scaled_mm(
            qi, fused_layer._w8a8_weight, si, fused_layer._w8a8_scale, dt, schedule)
    if torchao_mm is not None:
        variants["int8 torchao int_scaled_matmul GEMM only"] = lambda: torchao_mm(qi, w_kn, si_dt) * w_scale
    variants["fp8 scaled_mm GEMM only"] = lambda: w8a8.fp8_gemm(fp8, qf, sf, dt)
    for kind in ("int", "fp8"):
        for impl in w8a8.QUANTIZERS:
            variants[f"{kind} {impl} quant only"] = lambda kind=kind, impl=impl: w8a8.quantize(x, kind, impl)
    return variants


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=None, help="default 16 (cuda) / 2 (cpu)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (cuda) / 32 (cpu)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--calls", type=int, default=1,
                        help="back-to-back calls per timing (default 1, as session 10 measured; 10 hides launch "
                             "overhead behind the GPU's work, as in a model's forward)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--layers", default=None,
                        help="comma-separated subset of the layers (default: all; a subset skips the decoder block)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU; use --device cpu for the smoke mode")
    batch, seq = args.batch or (16 if cuda else 2), args.seq or (512 if cuda else 32)
    shapes = LLAMA3_8B_LAYERS if cuda else SMOKE_LAYERS
    if args.layers:
        unknown = set(args.layers.split(",")) - set(shapes)
        if unknown:
            raise SystemExit(f"--layers: unknown {sorted(unknown)}; allowed values: {list(shapes)}")
        shapes = {name: shape for name, shape in shapes.items() if name in args.layers.split(",")}
    measure = median_ms_timer(args.device, warmup=5 if cuda else 1, iters=args.iters if cuda else 3,
                              calls=args.calls)
    torchao = (f"importable, autotuner {os.environ.get('TORCHAO_AUTOTUNER_ENABLE', '0')}"
               if _torchao_int_scaled_matmul() is not None else "absent")
    print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, tokens {batch}x{seq}, "
          f"{args.calls} call(s) per timing; torchao {torchao}"
          f"; defaults: int8 backend {next(b for b in AUTO_ORDER if b.startswith('w8a8'))}, "
          f"quantizer {w8a8.CUDA_QUANTIZER}")
    table: dict[str, dict[str, float]] = {}
    errors: dict[str, list[float]] = {}
    kept: dict[str, dict] = {}  # layer name → its `cuda_layers`, for the decoder block
    for name, (k, n) in shapes.items():
        dense, int8, fp8 = _layers(k, n, args.device)
        x = torch.randn(batch * seq, k, device=args.device, dtype=torch.bfloat16)
        if cuda:
            kept[name] = cuda_layers(x, dense, int8, fp8)
            variants = cuda_variants(x, kept[name], compile_ok=not args.no_compile)
            try:
                fused, int_mm = variants["int8 fused triton (layer)"], variants["int8 int_mm+rescale, triton quant"]
                same = torch.equal(fused(), int_mm())
            except Exception as error:
                print(f"# int8 bit check failed on {name}: {error!r}"[:500], flush=True)
                same = math.nan
            errors.setdefault("int8 fused == int_mm+rescale (bits)", []).append(float(same))
        else:
            variants = {"bf16": lambda: F.linear(x, dense), "int8 int_mm+rescale (layer)": lambda: int8(x),
                        "fp8 dequant (layer)": lambda: fp8(x)}
        for label, fn in variants.items():
            try:
                table.setdefault(label, {})[name] = measure(fn)
            except Exception as error:  # one path failing (say, a Triton config on this GPU) leaves the others
                print(f"# {label} failed on {name}: {error!r}"[:500], flush=True)
                table[label][name] = math.nan
        errors.setdefault("int8", []).append(_rel(int8(x), F.linear(x, int8.dequantized_weight(torch.bfloat16))))
        errors.setdefault("fp8", []).append(_rel(fp8(x), F.linear(x, fp8.dequantized_weight(torch.bfloat16))))
        errors.setdefault("int8 vs float weights", []).append(_rel(int8(x), F.linear(x, dense)))
        print(f"# {name} {k}->{n} done; backends int8 {int8.backend}, fp8 {fp8.backend}", flush=True)
    print_table(table, list(shapes))
    print("\n# relative error vs bf16 with the dequantized weights (activation quantization only), max over layers;"
          " 'bits': 1.0 when the two int8 GEMMs agree bit for bit on every layer")
    print(json.dumps({key: round(max(v), 5) if "bits" not in key else min(v) for key, v in errors.items()}))
    if not cuda:
        return
    base = sum(table["bf16"].values())
    print_targets("per-layer sum", {label: base / sum(row.values()) for label, row in table.items()
                                    if not any(mark in label for mark in PART_MARKS)})
    if set(kept) == set(LLAMA3_8B_LAYERS):
        block = decoder_block(kept, batch * seq, measure, compile_ok=not args.no_compile)
        print("\n# one decoder layer's seven linears called back to back, q/k/v on one input and gate/up on another, as"
              " in a model's forward\n# (each layer still quantizes its input itself: torch.compile does not merge"
              " the custom ops)")
        for label, ms in block.items():
            print(f"{label:32s} {ms:9.3f} ms  x{block['bf16 eager'] / ms:.2f}")
        print_targets("decoder block", {label: block["bf16 eager"] / ms for label, ms in block.items()})


# which activations each linear of a Llama decoder layer reads
DECODER_INPUTS = {"q_proj": "attention in", "k_proj": "attention in", "v_proj": "attention in",
                  "o_proj": "attention out", "gate_proj": "mlp in", "up_proj": "mlp in", "down_proj": "mlp hidden"}


def decoder_block(kept: dict[str, dict], tokens: int, measure, compile_ok: bool,
                  device: str = "cuda") -> dict[str, float]:
    """label → ms of the seven linears of one decoder layer called together on shared inputs, per path."""
    inputs = {}
    for name, (k, _) in LLAMA3_8B_LAYERS.items():
        inputs.setdefault(DECODER_INPUTS[name], torch.randn(tokens, k, device=device, dtype=torch.bfloat16))
    times = {}
    for path in kept["q_proj"]:
        def run(path=path):
            return [kept[name][path](inputs[DECODER_INPUTS[name]]) for name in LLAMA3_8B_LAYERS]

        times[f"{path} eager"] = measure(run)
        if compile_ok:
            times[f"{path} compiled"] = measure(torch.compile(run))
    return times


def print_targets(what: str, speedups: dict[str, float]) -> None:
    """The best whole-layer variant of each format against issue 25's targets."""
    parts = []
    for fmt, target in (("int8", 1.3), ("fp8", 1.6)):
        label, best = max(((label, x) for label, x in speedups.items() if label.startswith(fmt) and not math.isnan(x)),
                          key=lambda t: t[1], default=("none ran", math.nan))
        parts.append(f"{fmt} >= {target}x: {best:.2f}x ({label}) {'met' if best >= target else 'NOT met'}")
    print(f"\n# targets, {what}: " + "; ".join(parts))


def print_table(table: dict[str, dict[str, float]], layers: list[str]) -> None:
    """One row per variant: ms per layer, the decoder layer's sum, its speed-up over bf16."""
    base = sum(table["bf16"].values())
    width = max(len(label) for label in table)
    print(f"\n# ms per layer (median), one decoder layer's linears summed, speed-up over bf16 (parts: "
          f"{', '.join(PART_MARKS)})")
    print(f"{'variant':{width}s} " + " ".join(f"{name:>9s}" for name in layers) + f" {'sum':>9s}  speed-up")
    for label, row in table.items():
        total = sum(row.values())
        print(f"{label:{width}s} " + " ".join(f"{row[name]:9.3f}" for name in layers) + f" {total:9.3f}  "
              f"x{base / total:.2f}")


if __name__ == "__main__":
    main()
