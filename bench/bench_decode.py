"""Decode and prefill speed of packed hfqat models vs bf16 through transformers' own `generate` (issue 21).

Headline (the user path): for each variant a random-weight Llama-3-8B-shaped model (hidden 4096, intermediate
14336, 32 layers, 32/8 heads, 128256-token untied head kept bf16) is converted with ``hfqat.quantize_model``
(``QATConfig``, group 128, symmetric, min-max scales: no training, so a checkpoint is ready in seconds), written
with ``hfqat.save_packed``, reloaded with ``AutoModelForCausalLM.from_pretrained(path)`` and timed in
``model.generate`` (greedy, batch 1, 16-token prompt, 128 new tokens):

- ``eager``: the default dynamic cache, no compilation;
- ``static``: ``cache_implementation="static"``, with which generate compiles the decode step
  (torch.compile, CUDA graphs); the first call (compilation) is reported as set-up time, the second is timed.

Variants (``--widths``): bf16, W4, W3, W2 (g128 sym) and ``mixed`` (per-row widths 3/4/5 in equal thirds,
average 4.0, rows shuffled: what row re-allocation produces; packed as `PackedRowsLinear`). ``w4@gemlite``
etc. pins a backend (`hfqat.export.packed.set_backend`); ``w4@fastest`` times tinygemm/triton/gemlite on
each layer shape and pins the fastest (`hfqat.export.packed.pin_fastest_backends`). Prefill (``--prefill``):
16×128 and 1×2048 tokens through the model's forward. Then a GEMV table (``--backends``): bf16 cuBLAS vs
hfqat's kernels vs the maintained PyPI kernels that install without compiling (gemlite, torchao int4,
humming), on the 8B shapes at M=1, 16 and 2048 (``--kernel-m``). The old hand-written decode loop (compiled
layer + one CUDA graph per token) is a last, optional table (``--sections ...,hand``). ``--sections ...,profile``
runs one more generate per variant and mode under torch.profiler and says where a token's time goes
(bench/decode_profile.py): GPU kernel time vs wall (the gap: the GPU waiting on the host), the GEMV/GEMM kernels'
read bandwidth vs the HBM peak, and the ratio vs bf16 that perfect linear kernels would reach with the measured
gap (the "ceiling"). Every line is printed as soon as it is measured; a time budget (``--budget-s``) skips what
is left and says so; the final table holds tokens/s and the ratio vs bf16.

GPU (H200). Static-cache generate compiles the 32-layer model once per variant (~1 min each), so the full run is
split in three commands of under 10 minutes (indented lines continue the command above); the later ones take
bf16 from the first (``--baseline``):
    PYTHONPATH=. python bench/bench_decode.py --device cuda --modes eager --out $OUT
    PYTHONPATH=. python bench/bench_decode.py --device cuda --modes static --sections generate --widths bf16,w4,mixed
        --out $OUT/static1
    PYTHONPATH=. python bench/bench_decode.py --device cuda --modes static --sections generate --widths w3,w2,w4@fastest
        --baseline $OUT/static1/bench_decode.json --out $OUT/static2
Why a target is missed (profile, ~4 minutes; static compile ~30 s per variant):
    PYTHONPATH=. python bench/bench_decode.py --device cuda --modes static --sections generate,profile
        --widths bf16,w4,w4@fastest --out $OUT/dec
(optional backends for the kernel table and ``@gemlite`` / ``@fastest``: ``pip install hfqat[gemlite]``, torchao,
humming-kernels; a missing one is reported in the table, not fatal).
CPU smoke (tiny model, a few seconds; what tests/test_bench_decode.py runs):
    PYTHONPATH=. python bench/bench_decode.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import decode_profile
import hfqat
from hfqat.export.packed import (
    PackedLinear,
    PackedRowsLinear,
    backends_in_use,
    pin_fastest_backends,
    prepare_backends,
    save_packed,
    set_backend,
)
from hfqat.quant.modeling import qat_layers

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
SMOKE = dict(LLAMA_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024)
KERNEL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256))  # (in, out) of the 8B layers
SMOKE_SHAPES = ((256, 256), (256, 512), (512, 256), (256, 1024))
WIDTHS = {"bf16": None, "w4": 4, "w3": 3, "w2": 2, "mixed": (3, 4, 5)}
GROUP_SIZE = 128


class Bench:
    """Shared state of one run: arguments, device, the clock, the log and the results."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.start = time.perf_counter()
        self.results = {"args": vars(args), "torch": torch.__version__, "generate": {}, "prefill": {},
                        "kernels": {}, "hand_loop": {}, "profile": {}, "checks": {}, "skipped": [], "errors": {},
                        "setup_s": {}}
        if self.device.type == "cuda":
            self.results["device"] = torch.cuda.get_device_name(self.device)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.0f}s] {msg}", flush=True)

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.start > self.args.budget_s:
            self.results["skipped"].append(what)
            self.log(f"time budget ({self.args.budget_s:.0f}s) reached: {what} skipped")
            return True
        return False

    def attempt(self, what: str, fn, *args):
        """fn(*args), or None with the error logged and recorded: one failure does not end a GPU run."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - reported, and the run goes on with the next item
            self.results["errors"][what] = f"{type(err).__name__}: {err}"[:2000]
            self.log(f"{what} FAILED: {type(err).__name__}: {str(err)[:500]}")
            torch._dynamo.reset()
            self.free()
            return None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn, repeat: int = 1) -> float:
        """Seconds per call of `fn` (after the caller's warm-up)."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / repeat

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -- building the variants ------------------------------------------------------------------------------------
def parse_variant(spec: str) -> tuple[str, str | None]:
    width, _, backend = spec.partition("@")
    if width not in WIDTHS:
        raise ValueError(f"--widths: {width!r} is unknown; allowed values: {list(WIDTHS)} (optionally @backend)")
    return width, backend or None


def float_model(bench: Bench, config: LlamaConfig):
    torch.manual_seed(0)
    with torch.device(bench.device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def mixed_row_bits(out_features: int, widths: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Equal shares of each width (the remainder at the middle width, so the average is exact), shuffled."""
    share = out_features // len(widths)
    counts = [share] * len(widths)
    counts[len(widths) // 2] += out_features - share * len(widths)
    bits = torch.cat([torch.full((c,), b) for b, c in zip(widths, counts, strict=True)])
    return bits[torch.randperm(out_features, generator=generator)]


def packed_checkpoint(bench: Bench, config: LlamaConfig, width: str, path: Path) -> Path:
    """QATConfig → quantize_model → save_packed, with no training (min-max scales)."""
    model = float_model(bench, config)
    widths = WIDTHS[width]
    mixed = isinstance(widths, tuple)
    qconfig = hfqat.QATConfig(bits=max(widths) if mixed else widths, group_size=GROUP_SIZE, scale_init="minmax",
                              bits_granularity="row" if mixed else "layer")
    hfqat.quantize_model(model, qconfig)
    model.config.quantization_config = qconfig
    if mixed:
        generator = torch.Generator().manual_seed(0)
        for _, layer in qat_layers(model):
            layer.set_row_bits(mixed_row_bits(layer.out_features, widths, generator))
    save_packed(model, path)
    del model
    bench.free()
    return path


def load_variant(bench: Bench, config: LlamaConfig, width: str, workdir: Path):
    if width == "bf16":
        return float_model(bench, config)
    path = packed_checkpoint(bench, config, width, workdir / width)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=str(bench.device)).eval()
    shutil.rmtree(path, ignore_errors=True)
    return model


def weight_bytes(model) -> int:
    """Bytes of the decoder's matrix weights as stored (packed words + scales, or bf16)."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, (PackedLinear, nn.Linear)) and not isinstance(module, PackedRowsLinear):
            tensors = [module.weight] if isinstance(module, nn.Linear) else [module.qweight, module.scales,
                                                                             module.zeros]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


# -- measurements -----------------------------------------------------------------------------------------------
def generate_kwargs(bench: Bench, static: bool, new_tokens: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    return kwargs


def prompt_ids(bench: Bench, model) -> torch.Tensor:
    return torch.randint(1, model.config.vocab_size, (1, bench.args.prompt_len), device=bench.device,
                         generator=torch.Generator(bench.device).manual_seed(1))


def measure_generate(bench: Bench, model, label: str, mode: str) -> dict:
    args = bench.args
    ids = prompt_ids(bench, model)
    static = mode == "static"
    kwargs = generate_kwargs(bench, static, args.new_tokens)
    with torch.no_grad():
        # warm-up: the whole length for static (the cache size is part of the compiled graph), a few tokens else
        warm_kwargs = kwargs if static else generate_kwargs(bench, False, min(8, args.new_tokens))
        setup = bench.timed(lambda: model.generate(ids, **warm_kwargs))
        out = {}
        seconds = bench.timed(lambda: out.setdefault("ids", model.generate(ids, **kwargs)))
    tokens = out["ids"][0, ids.shape[1]:].tolist()
    return {"tokens_per_s": args.new_tokens / seconds, "ms_per_token": 1e3 * seconds / args.new_tokens,
            "setup_s": setup, "first_tokens": tokens[:8]}


def profile_generate(bench: Bench, model, mode: str, timed: dict, read_bytes: int) -> dict:
    """One more generate of the timed length under torch.profiler (after the timed one, so static mode reuses
    its compiled graphs): where each token's time goes (`decode_profile.summarize`)."""
    args = bench.args
    ids = prompt_ids(bench, model)
    kwargs = generate_kwargs(bench, mode == "static", args.new_tokens)
    with torch.no_grad():
        activities, seconds = decode_profile.profiled(lambda: model.generate(ids, **kwargs),
                                                      bench.device.type == "cuda", bench.sync)
    bf16_wall = bench.results["generate"].get("bf16", {}).get(mode, {}).get("ms_per_token")
    row = decode_profile.summarize(activities, args.new_tokens, timed["ms_per_token"], read_bytes,
                                   decode_profile.hbm_peak_gbps(bench.results.get("device")), bf16_wall)
    row["profiled_wall_ms"] = 1e3 * seconds / args.new_tokens  # the profiler's own cost included
    return row


def measure_prefill(bench: Bench, model, batch: int, length: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=bench.device)
    with torch.no_grad():
        def run():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

        run()
        run()
        seconds = bench.timed(run, repeat=3)
    return {"tokens_per_s": batch * length / seconds, "ms": 1e3 * seconds}


def exactness_check(bench: Bench, model, label: str) -> float:
    """First-forward logits of the chosen kernels vs the exact dequantize fallback, relative L2 error."""
    ids = torch.randint(0, model.config.vocab_size, (1, bench.args.prompt_len), device=bench.device)
    layers = [m for m in model.modules() if hasattr(m, "force_backend")]
    pinned = [(m, m.force_backend) for m in layers]
    with torch.no_grad():
        fast = model(input_ids=ids).logits.float()
        set_backend(model, "dequant")
        exact = model(input_ids=ids).logits.float()
        for m, backend in pinned:
            m.force_backend = backend
        prepare_backends(model, torch.bfloat16)
    rel = ((fast - exact).norm() / exact.norm()).item()
    bench.results["checks"][label] = {"logits_rel_err_vs_exact": rel}
    return rel


def run_generate(bench: Bench, config: LlamaConfig) -> None:
    args = bench.args
    workdir = Path(tempfile.mkdtemp(prefix="hfqat_bench_", dir=args.workdir))
    modes = [m for m in args.modes.split(",") if m]
    prefill = [tuple(int(v) for v in s.split("x")) for s in args.prefill.split(",") if s]
    try:
        for spec in args.widths.split(","):
            width, backend = parse_variant(spec)
            if bench.over_budget(f"variant {spec}"):
                continue
            t0 = time.perf_counter()
            model = bench.attempt(f"variant {spec}", load_variant, bench, config, width, workdir)
            if model is None:
                continue
            if width != "bf16" and bench.attempt(f"{spec} backends", prepare_variant, bench, model, backend) is None:
                del model
                bench.free()
                continue
            bench.results["setup_s"][spec] = time.perf_counter() - t0
            used = sorted({b for b in backends_in_use(model).values() if b}) if width != "bf16" else ["cuBLAS"]
            decoder_bytes = weight_bytes(model)
            gb = decoder_bytes / 1e9
            # bytes each decode step must read: decoder weights + head
            read_bytes = decoder_bytes + sum(p.numel() * p.element_size() for p in model.lm_head.state_dict().values())
            note = ""
            if width != "bf16":
                note = f", logits rel err vs exact {exactness_check(bench, model, spec):.1e}"
            bench.log(f"{spec}: built+saved+loaded in {bench.results['setup_s'][spec]:.0f}s, decoder weights "
                      f"{gb:.3f} GB, backends {used}{note}")
            for mode in modes:
                if bench.over_budget(f"{spec} generate {mode}"):
                    continue
                row = bench.attempt(f"{spec} generate {mode}", measure_generate, bench, model, spec, mode)
                if row is None:
                    continue
                # the bytes read per step at this speed: how far from HBM peak
                row.update(weights_GB=gb, backends=used, streamed_GBps=read_bytes / 1e9 * row["tokens_per_s"])
                bench.results["generate"].setdefault(spec, {})[mode] = row
                base = bench.results["generate"].get("bf16", {}).get(mode, {}).get("tokens_per_s")
                ratio = f"  x{row['tokens_per_s'] / base:.2f} vs bf16" if base else ""
                bench.log(f"  generate {mode:6s} {row['tokens_per_s']:8.1f} tok/s{ratio}  "
                          f"({row['ms_per_token']:.2f} ms/token, first call {row['setup_s']:.0f}s)")
                if "profile" in args.sections and not bench.over_budget(f"{spec} profile {mode}"):
                    prof = bench.attempt(f"{spec} profile {mode}", profile_generate, bench, model, mode, row,
                                         read_bytes)
                    if prof is not None:
                        bench.results["profile"].setdefault(spec, {})[mode] = prof
                        bench.log(f"  profile  {mode:6s} {decode_profile.describe(prof)}")
            if "prefill" in args.sections:
                for batch, length in prefill:
                    if bench.over_budget(f"{spec} prefill {batch}x{length}"):
                        continue
                    row = bench.attempt(f"{spec} prefill {batch}x{length}", measure_prefill, bench, model, batch,
                                        length)
                    if row is None:
                        continue
                    key = f"{batch}x{length}"
                    bench.results["prefill"].setdefault(spec, {})[key] = row
                    base = bench.results["prefill"].get("bf16", {}).get(key, {}).get("tokens_per_s")
                    ratio = f"  x{row['tokens_per_s'] / base:.2f} vs bf16" if base else ""
                    bench.log(f"  prefill {key:8s} {row['tokens_per_s']:10.0f} tok/s{ratio}  ({row['ms']:.1f} ms)")
            row = None
            if "hand" in args.sections and not bench.over_budget(f"{spec} hand loop"):
                row = bench.attempt(f"{spec} hand loop", hand_loop, bench, model)
            if row is not None:
                bench.results["hand_loop"][spec] = row
                base = bench.results["hand_loop"].get("bf16", {}).get("tokens_per_s")
                ratio = f"  x{row['tokens_per_s'] / base:.2f} vs bf16" if base else ""
                bench.log(f"  hand loop ({row['mode']}) {row['tokens_per_s']:8.1f} tok/s{ratio}")
            del model
            torch._dynamo.reset()  # each variant compiles its own graphs; keep the caches from piling up
            bench.free()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def prepare_variant(bench: Bench, model, backend: str | None) -> bool:
    """Pin `backend` (or time and pin the fastest per layer shape) and set every packed layer up now, outside
    any compiled region."""
    if backend == "fastest":
        for key, times in pin_fastest_backends(model, torch.bfloat16).items():
            bench.log(f"  fastest at M=1 for (in, out, bits, group, sym)={key}: "
                      + ", ".join(f"{b} {us:.1f} us" for b, us in times.items()))
    else:
        set_backend(model, backend)
    prepare_backends(model, torch.bfloat16)
    if "tune" in bench.args.sections:
        tune_decode_kernels(model)
    return True


def tune_decode_kernels(model) -> None:
    """Tune the Triton GEMV launch of every distinct packed shape (CUDA; a few seconds per shape)."""
    from hfqat.export.kernels import triton_lowbit

    seen = set()
    for module in model.model.layers.modules():
        if isinstance(module, PackedRowsLinear) and module.backend == "triton_rows":
            key = (module.out_features, module.in_features, tuple(p.bits for p in module.parts))
        elif isinstance(module, PackedLinear) and module.backend == "triton":
            key = (module.out_features, module.in_features, module.bits)
        else:
            continue
        if key not in seen:
            seen.add(key)
            triton_lowbit.tune_gemv(module, torch.bfloat16)


# -- kernels side by side -----------------------------------------------------------------------------------
def _time_us(bench: Bench, fn) -> float:
    fn()
    fn()
    if bench.device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        try:
            return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
        except Exception:  # a kernel that cannot be captured: plain timing (launch overhead included)
            return do_bench(fn, rep=50, return_mode="median") * 1e3
    return bench.timed(fn, repeat=5) * 1e6


def _external(name: str, linear: nn.Linear, bits: int):
    """A module computing ``x @ W.T`` with a maintained PyPI kernel, or a string saying why not."""
    try:
        if name == "torchao":
            if bits != 4:
                return "int4 only"
            import copy

            from torchao.quantization import Int4WeightOnlyConfig, quantize_

            module = nn.Sequential(copy.deepcopy(linear))
            try:
                quantize_(module, Int4WeightOnlyConfig(group_size=GROUP_SIZE, int4_packing_format="tile_packed_to_4d"))
            except TypeError:  # older torchao: the tile-packed layout is the default
                quantize_(module, Int4WeightOnlyConfig(group_size=GROUP_SIZE))
            return module
        if name == "humming":
            from humming.layer import HummingLayer

            module = HummingLayer(shape_n=linear.out_features, shape_k=linear.in_features,
                                  weight_config={"dtype": f"int{bits}", "group_size": GROUP_SIZE},
                                  torch_dtype=torch.bfloat16).to(linear.weight.device)
            module.load_from_unquantized(linear.weight.data)
            module.transform()
            return module
    except Exception as err:  # not installed, or it refuses this shape/width: say so in the table
        return f"{type(err).__name__}: {str(err)[:120]}"
    return f"unknown backend {name!r}"


def _ours(linear: nn.Linear, bits, backend: str | None):
    if isinstance(bits, tuple):
        row_bits = mixed_row_bits(linear.out_features, bits, torch.Generator().manual_seed(0))
        layer = PackedRowsLinear.from_float(linear, row_bits, GROUP_SIZE, True, scale_init="minmax")
    else:
        layer = PackedLinear.from_float(linear, bits, GROUP_SIZE, True, scale_init="minmax")
    set_backend(nn.Sequential(layer), backend)
    prepare_backends(nn.Sequential(layer), torch.bfloat16)
    return layer


def run_kernels(bench: Bench) -> None:
    args = bench.args
    shapes = SMOKE_SHAPES if args.smoke else KERNEL_SHAPES
    backends = [b for b in args.backends.split(",") if b]
    widths = [WIDTHS[w] for w in dict.fromkeys(parse_variant(s)[0] for s in args.widths.split(",")) if w != "bf16"]
    for k, n in shapes:
        if bench.over_budget(f"kernels {k}x{n}"):
            continue
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False, device=bench.device, dtype=torch.bfloat16)
        nn.init.normal_(linear.weight, std=0.02)
        table = bench.results["kernels"].setdefault(f"{k}x{n}", {})
        xs = {m: torch.randn(m, k, device=bench.device, dtype=torch.bfloat16) for m in args.kernel_m}
        for m, x in xs.items():
            us = _time_us(bench, lambda x=x, w=linear.weight: F.linear(x, w))
            table.setdefault("bf16", {})[f"M={m}"] = {"us": us, "GB": linear.weight.numel() * 2 / 1e9}
            bench.log(f"  {k:5d}x{n:<6d} M={m:<4d} {'bf16 cuBLAS':22s} {us:8.1f} us, "
                      f"{linear.weight.numel() * 2 / us / 1e3:5.0f} GB/s")
        for bits in widths:
            label = "mixed345" if isinstance(bits, tuple) else f"W{bits}"
            candidates = {}
            if "ours" in backends:
                candidates["hfqat"] = lambda bits=bits, lin=linear: _ours(lin, bits, None)
                if bits == 4 and bench.device.type == "cuda":
                    candidates["hfqat-triton"] = lambda bits=bits, lin=linear: _ours(lin, bits, "triton")
            if not isinstance(bits, tuple):
                if "gemlite" in backends:
                    candidates["gemlite"] = lambda bits=bits, lin=linear: _ours(lin, bits, "gemlite")
                for name in ("torchao", "humming"):
                    if name in backends:
                        candidates[name] = lambda bits=bits, name=name, lin=linear: _external(name, lin, bits)
            for name, make in candidates.items():
                try:
                    module = make()
                except Exception as err:  # e.g. gemlite missing: set_backend refuses, the table says so
                    module = f"{type(err).__name__}: {str(err)[:120]}"
                key = f"{label} {name}"
                if isinstance(module, str):
                    table[key] = {"unavailable": module}
                    bench.log(f"  {k}x{n} {key}: unavailable ({module})")
                    continue
                nbytes = None  # bytes a GEMV must read: the stored packed words and scales (ours)
                if isinstance(module, (PackedLinear, PackedRowsLinear)):
                    nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
                for m, x in xs.items():
                    with torch.no_grad():
                        us = _time_us(bench, lambda x=x, module=module: module(x))
                        ref = x.float() @ linear.weight.float().t()
                        rel = ((module(x).float() - ref).norm() / ref.norm()).item()  # quantization + kernel
                    backend = getattr(module, "backend", name)
                    table.setdefault(key, {})[f"M={m}"] = {"us": us, "rel_err_vs_bf16_weight": rel,
                                                          "backend": backend}
                    base = table["bf16"][f"M={m}"]["us"]
                    bw = f", {nbytes / us / 1e3:5.0f} GB/s" if nbytes else ""
                    bench.log(f"  {k:5d}x{n:<6d} M={m:<4d} {key:22s} {us:8.1f} us  x{base / us:.2f} vs bf16 "
                              f"({base:.1f} us){bw}  [{backend}] err {rel:.1e}")
                    own = getattr(module, "_gemlite", None)
                    if own is not None and m > 64:  # our layer hands large M to dequant+cuBLAS; gemlite's own GEMM
                        with torch.no_grad():
                            own_us = _time_us(bench, lambda x=x, own=own: own(x))
                        table[key][f"M={m} gemlite GEMM"] = {"us": own_us, "backend": "gemlite own GEMM"}
                        bench.log(f"  {k:5d}x{n:<6d} M={m:<4d} {key + ' own GEMM':22s} {own_us:8.1f} us  "
                                  f"x{base / own_us:.2f} vs bf16")
                del module
        del linear
        bench.free()


# -- the hand-written decode loop (second table) --------------------------------------------------------------
def _layer_step(layer, h, cos, sin, k_cache, v_cache, pos, mask):
    """One Llama decoder layer for one token with a static cache (GQA as grouped queries per KV head)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, 1, n_kv, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, 1, n_kv, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    o = F.scaled_dot_product_attention(q.reshape(1, n_kv, -1, head_dim), k_cache, v_cache, attn_mask=mask)
    h = h + attn.o_proj(o.reshape(1, 1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class StaticDecoder:
    """Greedy batch-1 decode with a static KV cache; on CUDA the whole token step is one CUDA graph."""

    def __init__(self, model, max_len: int, layer_fn):
        cfg = model.config
        self.model, self.layer_fn, self.max_len = model, layer_fn, max_len
        device, dtype = model.device, model.dtype
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        shape = (1, cfg.num_key_value_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.positions = torch.arange(max_len, device=device)
        self.tok = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(max_len, dtype=torch.long, device=device)
        self.graph = None

    def logits(self, tok, pos):
        m = self.model.model
        h = m.embed_tokens(tok.view(1, 1))
        cos, sin = m.rotary_emb(h, pos.view(1, 1))
        mask = torch.where(self.positions <= pos, 0.0, float("-inf")).to(h.dtype).view(1, 1, 1, -1)
        for i, layer in enumerate(m.layers):
            h = self.layer_fn(layer, h, cos, sin, self.k[i], self.v[i], pos, mask)
        return self.model.lm_head(m.norm(h))[0, -1]

    def _step(self):
        nxt = self.logits(self.tok, self.pos).argmax(-1, keepdim=True)
        self.out.index_copy_(0, self.pos, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    def capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def generate(self, n_tokens: int) -> tuple[list[int], float]:
        """(tokens, seconds) for n greedy tokens after token id 1."""
        self.tok.fill_(1)
        self.pos.zero_()
        step = self._step if self.graph is None else self.graph.replay
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n_tokens):
            step()
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return self.out[:n_tokens].tolist(), time.perf_counter() - start


def hand_loop(bench: Bench, model) -> dict:
    n = bench.args.new_tokens
    cuda = bench.device.type == "cuda"
    layer_fn = torch.compile(_layer_step, dynamic=False) if cuda else _layer_step
    with torch.no_grad():
        dec = StaticDecoder(model, n + 8, layer_fn)
        dec.generate(2)
        if cuda:
            dec.capture()
        dec.generate(n)
        tokens, seconds = dec.generate(n)
    return {"tokens_per_s": n / seconds, "mode": "compile+graph" if cuda else "eager", "first_tokens": tokens[:8]}


def run_check() -> None:
    """The hand-written static-cache decode equals transformers' greedy generate (tiny random Llama, fp32)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SMOKE, hidden_size=64, intermediate_size=128, vocab_size=256))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            model.model.layers.set_submodule(name, PackedLinear.from_float(module, 4, 32, True))
    with torch.no_grad():
        ref = model.generate(torch.tensor([[1]]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 1:]
        tokens, _ = StaticDecoder(model, 32, _layer_step).generate(24)
    assert tokens == ref.tolist(), (tokens, ref.tolist())
    print("check ok: static decoder == generate:", tokens[:12])


# -- report ---------------------------------------------------------------------------------------------------
def summary(bench: Bench) -> str:
    r = bench.results
    lines = ["", "== generate (batch 1, greedy, tokens/s; x = ratio vs bf16; GB/s = weights + head read per token "
                 "x tokens/s, H200 HBM peak 4800) =="]
    modes = [m for m in bench.args.modes.split(",") if m]
    prefill = [s for s in bench.args.prefill.split(",") if s] if "prefill" in bench.args.sections else []
    header = "| model | weights GB | " + " | ".join(f"generate {m}" for m in modes) + "".join(
        f" | prefill {p}" for p in prefill) + " |"
    lines += [header, "|" + "---|" * (2 + len(modes) + len(prefill))]
    for spec in dict.fromkeys(["bf16", *bench.args.widths.split(",")]):  # bf16 first, measured or --baseline
        gen, pre = r["generate"].get(spec, {}), r["prefill"].get(spec, {})
        if not gen and not pre:
            continue
        gb = next((row["weights_GB"] for row in gen.values()), float("nan"))
        cells = []
        for m in modes:
            row, base = gen.get(m), r["generate"].get("bf16", {}).get(m)
            cells.append("-" if row is None else f"{row['tokens_per_s']:.1f}" + (
                f" ({row['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if base else "") + (
                f", {row['streamed_GBps']:.0f} GB/s" if "streamed_GBps" in row else ""))
        for p in prefill:
            row, base = pre.get(p), r["prefill"].get("bf16", {}).get(p)
            cells.append("-" if row is None else f"{row['tokens_per_s']:.0f}" + (
                f" ({row['tokens_per_s'] / base['tokens_per_s']:.2f}x)" if base else ""))
        lines.append(f"| {spec} | {gb:.3f} | " + " | ".join(cells) + " |")
    if r["profile"]:
        lines += decode_profile.table(r["profile"])
    if r["hand_loop"]:
        lines += ["", "== hand-written loop (compiled layer + one CUDA graph per token) =="]
        base = r["hand_loop"].get("bf16", {}).get("tokens_per_s")
        for spec, row in r["hand_loop"].items():
            lines.append(f"{spec:12s} {row['tokens_per_s']:8.1f} tok/s" + (
                f"  x{row['tokens_per_s'] / base:.2f}" if base else ""))
    if r["kernels"]:
        lines += ["", "== GEMV/GEMM: microseconds (x = speed vs bf16 cuBLAS) =="]
        for shape, table in r["kernels"].items():
            for key, row in table.items():
                if "unavailable" in row:
                    lines.append(f"{shape:11s} {key:22s} unavailable: {row['unavailable']}")
                    continue
                cells = []
                for m, cell in row.items():
                    if not isinstance(cell, dict):
                        continue
                    base = table["bf16"][m.split(" ")[0]]["us"]
                    cells.append(f"{m} {cell['us']:7.1f} us x{base / cell['us']:.2f}")
                lines.append(f"{shape:11s} {key:22s} " + "   ".join(cells))
    if r["skipped"]:
        lines.append(f"skipped (time budget): {r['skipped']}")
    for what, err in r["errors"].items():
        lines.append(f"FAILED {what}: {err[:300]}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes (CPU test)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; smoke 2)")
    parser.add_argument("--widths", default="bf16,w4,mixed,w3,w2",
                        help=f"variants, comma-separated, from {list(WIDTHS)}; width@backend pins a backend")
    parser.add_argument("--modes", default=None, help="generate modes: eager,static (default both; smoke eager)")
    parser.add_argument("--sections", default="generate,prefill,kernels",
                        help="generate, prefill (needs generate), kernels, hand (hand-written loop), tune "
                             "(tune Triton GEMV launches before timing), profile (one more generate under "
                             "torch.profiler per variant and mode: where a token's time goes)")
    parser.add_argument("--prefill", default=None, help="BxL list (default 16x128,1x2048; smoke 2x16,1x64)")
    parser.add_argument("--backends", default="ours,gemlite,torchao,humming", help="kernel table backends")
    parser.add_argument("--kernel-m", default="1,16,2048", help="rows (tokens) of the kernel table's inputs")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128; smoke 8")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start nothing new after this many seconds (an item already begun finishes)")
    parser.add_argument("--baseline", default=None,
                        help="bench_decode.json of an earlier run on the same machine: its bf16 rows are the "
                             "reference when this run does not measure bf16 (split long runs)")
    parser.add_argument("--workdir", default=None, help="where packed checkpoints are written (then deleted)")
    parser.add_argument("--check", action="store_true", help="hand loop == generate on a tiny model, then exit")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for bench_decode.json")
    args = parser.parse_args()
    if args.check:
        return run_check()
    args.layers = args.layers or (2 if args.smoke else 32)
    args.modes = args.modes or ("eager" if args.smoke else "eager,static")
    args.prefill = args.prefill or ("2x16,1x64" if args.smoke else "16x128,1x2048")
    args.new_tokens = args.new_tokens or (8 if args.smoke else 128)
    args.kernel_m = [int(m) for m in args.kernel_m.split(",") if m]
    bench = Bench(args)
    if args.baseline:
        earlier = json.loads(Path(args.baseline).read_text())
        for section in ("generate", "prefill", "hand_loop", "profile"):
            if "bf16" in earlier.get(section, {}):
                bench.results[section]["bf16"] = earlier[section]["bf16"]
        bench.log(f"bf16 reference rows from {args.baseline}")
    torch.set_grad_enabled(False)
    import torch._dynamo.config as dynamo_config

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 256)
    config = LlamaConfig(**dict(SMOKE if args.smoke else LLAMA_8B, num_hidden_layers=args.layers))
    bench.log(f"{args.layers}-layer {'smoke' if args.smoke else 'Llama-3-8B'}-shaped model on "
              f"{bench.results.get('device', args.device)}; widths {args.widths}; modes {args.modes}; "
              f"sections {args.sections}")
    try:
        if any(s in args.sections for s in ("generate", "prefill", "hand", "profile")):
            run_generate(bench, config)
        if "kernels" in args.sections:
            bench.log("kernels (random bf16 weights, g128 sym):")
            run_kernels(bench)
    finally:
        print(summary(bench), flush=True)
        total = time.perf_counter() - bench.start
        bench.results["total_s"] = total
        if bench.device.type == "cuda":
            bench.results["peak_GiB"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
        print(f"total {total:.0f}s", flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
                json.dump(bench.results, f, indent=1, default=str)
    return bench.results


if __name__ == "__main__":
    main()
