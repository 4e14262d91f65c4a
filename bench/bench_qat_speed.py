"""QAT training-step speed and memory vs a plain bf16 fine-tune, side by side in one run (GPU).

A Llama-shaped model with random init (default: the 1B shape, hidden 2048, inter 8192, 16 layers, GQA 32/8 heads,
vocab 32000), bf16 weights, AdamW (fused), SDPA attention, random tokens. Variants, each on a fresh model:

- ``bf16``               plain fine-tune step (the reference)
- ``hfqat``              W4 g128 symmetric fake quant, learned scales (fused Triton kernels on CUDA)
- ``hfqat (torch path)`` the same with the Triton kernels switched off (what the kernels save)
- ``hfqat + teacher``    plus QATCallback's default distillation teacher (snapshot of the float weights), no
                         re-allocation: ``QATCallback(budget_bits=None, reallocate_every=0)``
- ``hfqat + QATCallback()`` the callback's full defaults (teacher, Fisher sensitivity in the last quarter of each
                         re-allocation interval, calibration and re-allocation every 50 steps): timed over one
                         whole interval (50 steps) and reported as the *mean* step, i.e. amortised
- ``hfqat + QATCallback() per row`` the same on ``QATConfig(bits_granularity="row")`` (one width per output row)
- ``torchao QAT``        peer: ``torchao.quantization.qat`` int4 per-group 128 weight fake quant (lm_head excluded)

Each step = forward + backward + optimizer step; the time is the median of CUDA-event timed steps after warm-up
(the mean for the amortised QATCallback() rows, which warm up through their first re-allocation and then time one
whole interval: measured steps, re-allocation and the grid updates of narrow layers on every step);
memory is the peak allocated during the timed steps (``teacher excluded`` subtracts the snapshot's bytes).
Ratios are against ``bf16``. A fake-quant exactness check (Triton vs torch code on a real layer, bit for bit) and
the re-allocation's error sums check (fused vs torch: the same clip ratios, Fisher costs to float rounding) are
printed first; ``--profile`` adds the top CUDA kernels of one hfqat step and, for the callback rows, the time spent
in each callback event over the timed interval (synchronised) and the top operators inside them.

Run: python bench/bench_qat_speed.py [--batch 8 --seq 2048 --steps 10 --variants bf16,hfqat,...]
CPU (a small shape, for profiling the callback's own cost): python bench/bench_qat_speed.py --device cpu --hidden 256
--inter 1024 --layers 4 --heads 4 --kv-heads 2 --vocab 4096 --seq 512 --batch 8
--variants hfqat+teacher,hfqat+callback,hfqat+callback-rows --profile
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import hfqat
from hfqat.quant import fused_fake_quant
from hfqat.quant.layers import QATLinear
from hfqat.quant.modeling import quantize_model
from hfqat.quant.primitives import dequantize, quantize
from hfqat.train import candidates, sensitivity
from hfqat.train.callback import QATCallback

VARIANTS = ("bf16", "hfqat", "hfqat-torch", "hfqat+teacher", "hfqat+callback", "hfqat+callback-rows", "torchao")
AMORTISED = ("hfqat+callback", "hfqat+callback-rows")  # their cost sits on some steps: timed over an interval
LABELS = {"bf16": "bf16 fine-tune", "hfqat": "hfqat W4 g128", "hfqat-torch": "hfqat W4 g128 (torch path)",
          "hfqat+teacher": "hfqat + distillation teacher", "hfqat+callback": "hfqat + QATCallback() defaults",
          "hfqat+callback-rows": "hfqat + QATCallback() per-row widths", "torchao": "torchao QAT int4 g128"}


def build_model(args) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


class CallbackDriver:
    """Calls a TrainerCallback's events around each step, as Trainer would (no Trainer overhead in the timing).

    ``seconds``: the time spent in each event once ``timed`` is set (CPU: process time; CUDA: wall time, synchronised
    around each event only under ``--profile``, ``sync``), i.e. what the callback itself adds to a step."""

    def __init__(self, callback, model, max_steps: int, output_dir: str) -> None:
        self.callback, self.model = callback, model
        cpu = next(model.parameters()).device.type == "cpu"
        self.args = TrainingArguments(output_dir, max_steps=max_steps, report_to=[], use_cpu=cpu)
        self.state = TrainerState(max_steps=max_steps, is_world_process_zero=True)
        self.control = TrainerControl()
        self.timed, self.sync, self.seconds = False, False, {}
        self.clock = time.process_time if cpu else time.perf_counter
        self._event("on_train_begin", model=model)

    def _event(self, name: str, **kwargs) -> None:
        if not self.timed:
            getattr(self.callback, name)(self.args, self.state, self.control, **kwargs)
            return
        if self.sync:
            torch.cuda.synchronize()
        start = self.clock()
        with torch.profiler.record_function(f"QATCallback.{name}"):
            getattr(self.callback, name)(self.args, self.state, self.control, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start

    def before(self):
        self._event("on_step_begin")

    def pre_optimizer(self):
        self._event("on_pre_optimizer_step")

    def after_optimizer(self):
        self._event("on_optimizer_step")

    def after(self):
        self.state.global_step += 1
        self._event("on_step_end")


def prepare(variant: str, args):
    """(model, callback driver or None, bytes to exclude from peak memory)."""
    model = build_model(args)
    driver, excluded = None, 0
    if variant.startswith("hfqat"):
        granularity = "row" if variant == "hfqat+callback-rows" else "layer"
        quantize_model(model, hfqat.QATConfig(bits=4, group_size=128, bits_granularity=granularity))
    if variant == "hfqat+teacher":
        driver = CallbackDriver(QATCallback(budget_bits=None, reallocate_every=0, write_plots=False), model,
                                args.warmup + args.steps, "/tmp/bench_qat_speed")
    elif variant in AMORTISED:
        # max_steps far ahead: the timed interval must not reach the freeze (0.8 · max_steps) that ends re-allocation
        driver = CallbackDriver(QATCallback(write_plots=False), model, 100 * (args.warmup + args.steps),
                                "/tmp/bench_qat_speed")
    if driver is not None and driver.callback._hook.teacher is not None:
        excluded = driver.callback._hook.teacher.nbytes()
    if variant == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat import QATConfig as AOQATConfig

        weight = IntxFakeQuantizeConfig(torch.int4, group_size=128)
        quantize_(model, AOQATConfig(weight_config=weight, step="prepare"),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    return model, driver, excluded


def run_variant(variant: str, args, batch: torch.Tensor) -> dict:
    fused_fake_quant.ENABLED = variant != "hfqat-torch"
    model, driver, excluded = prepare(variant, args)
    model.train()
    cuda = args.device == "cuda"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)

    def step():
        if driver:
            driver.before()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if driver:
            driver.pre_optimizer()
        optimizer.step()
        if driver:
            driver.after_optimizer()
        optimizer.zero_grad(set_to_none=True)
        if driver:
            driver.after()
        return loss.detach()

    amortised = variant in AMORTISED
    interval = driver.callback.reallocate_every if amortised else 0
    for _ in range(args.warmup + interval):  # amortised: through the first re-allocation (narrow layers from then on)
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    profiler = None
    if driver:
        driver.timed = True
        driver.sync = cuda and args.profile
    if args.profile and amortised:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        profiler.__enter__()
    for _ in range(max(args.steps, interval) if amortised else args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:  # CPU: a smoke run, or the callback's own cost on a small shape. Process CPU time (one thread with
            # OMP_NUM_THREADS=1): what the step computes, not how long other processes held the cores.
            start = time.process_time()
            losses.append(step())
            times.append(time.process_time() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    result = {"time": (statistics.mean if amortised else statistics.median)(times), "spread": (max(times) - min(times)) / statistics.median(times),
              "peak": peak, "peak_ex": peak - excluded, "loss": float(losses[-1]),
              "callback": sum(driver.seconds.values()) / len(times) if driver else 0.0}
    if args.profile and variant == "hfqat" and cuda:
        result["profile"] = profile_step(step)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        result["profile"] = callback_profile(driver, profiler, times, cuda)
    fused_fake_quant.ENABLED = True
    return result


def profile_step(step) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60)


def callback_profile(driver, profiler, times: list[float], cuda: bool) -> str:
    """Time in each callback event over the timed steps (share of their total) and the top operators."""
    total = sum(times)
    lines = [f"    callback events over the {len(times)} timed steps ({total * 1e3:.0f} ms in all, profiler on):"]
    for name, seconds in sorted(driver.seconds.items(), key=lambda item: -item[1]):
        lines.append(f"      {name}: {seconds * 1e3:.1f} ms ({seconds / total:.1%})")
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines.append(profiler.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    return "\n".join(lines)


def exactness_check() -> str:
    """Triton forward == torch dequantize(quantize()) bit for bit, on a bf16 (8192, 2048) weight, sym and asym."""
    torch.manual_seed(1)
    w = (torch.randn(8192, 2048, device="cuda") * 0.02).to(torch.bfloat16)
    out = []
    for symmetric in (True, False):
        spec = hfqat.QATConfig(bits=4, group_size=128, symmetric=symmetric).spec_for("x", 2048)
        linear = torch.nn.Linear(2048, 8192, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = QATLinear.from_float(linear, spec)
        layer.weight.data.copy_(w)
        layer.reset_quant_params()
        ref = dequantize(quantize(w, layer.weight_scale, layer.weight_zero_point, 4, 128),
                         layer.weight_scale, layer.weight_zero_point, 128).to(torch.bfloat16)
        fused = layer.quantized_weight()
        out.append(f"{'sym' if symmetric else 'asym'}: {'exact' if torch.equal(fused, ref) else 'MISMATCH'}")
    return ", ".join(out)


def sensitivity_check() -> str:
    """The re-allocation's fused error sums (`hfqat.quant.fused_group_errors`) vs its torch code on a bf16 (8192, 2048)
    layer: the same clip ratios, Fisher costs within float rounding (summed in another order)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    linear = torch.nn.Linear(2048, 8192, bias=False, device="cuda", dtype=torch.bfloat16)
    linear.weight.data.copy_(torch.randn(8192, 2048, device="cuda", generator=g) * 0.02)
    layer = QATLinear.from_float(linear, hfqat.QATConfig(bits=4, group_size=128).spec_for("x", 2048))
    layer.reset_quant_params()
    fisher, choices = torch.rand(8192, 2048, device="cuda", generator=g), (2, 3, 4, 8)
    estimator = sensitivity.make_estimator("fisher", choices, 0.9)
    found = []
    for fused in (True, False):
        fused_fake_quant.ENABLED = fused
        estimator.clip, estimator._bits = {"x": candidates.fit_clip_ratios(layer, choices)}, {"x": 4}
        found.append((estimator.clip["x"], estimator._weighted(layer, "x", fisher)))
    fused_fake_quant.ENABLED = True
    (clip, costs), (torch_clip, torch_costs) = found
    worst = float(((costs - torch_costs).abs() / torch_costs.abs()).max())
    return f"clip ratios {'equal' if clip == torch_clip else f'DIFFER {clip} vs {torch_clip}'}, Fisher costs " \
           f"within {worst:.1e} (relative)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (tiny dims)")
    args = parser.parse_args()
    command = f"python {' '.join(sys.argv)}"
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"command: {command}\ntorch {torch.__version__}, {device}")
    if args.device == "cuda":
        print(f"fake-quant exactness (Triton vs torch, bf16): {exactness_check()}")
        print(f"re-allocation error sums (fused vs torch, bf16): {sensitivity_check()}")

    batch = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device,
                          generator=torch.Generator(device=args.device).manual_seed(0))
    results = {}
    for variant in args.variants.split(","):
        try:
            results[variant] = run_variant(variant, args, batch)
        except (ImportError, torch.OutOfMemoryError) as err:  # a missing peer or a batch too large for it
            results[variant] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}
        gc.collect()  # the variant's model and optimizer die with run_variant's frame
        if args.device == "cuda":
            torch.cuda.empty_cache()
        r = results[variant]
        print(f"  {variant}: {r.get('time', 0) * 1e3:.1f} ms, peak {r.get('peak', 0) / 2**30:.2f} GiB "
              f"{r.get('error', '')}", flush=True)
        if "profile" in r:
            print(r["profile"])

    tokens = args.batch * args.seq
    base = results.get("bf16", {})
    print(f"\n### Llama {args.hidden}/{args.inter}x{args.layers}, vocab {args.vocab}, batch {args.batch} x seq "
          f"{args.seq} ({tokens} tokens/step), bf16 weights, AdamW fused, {device}")
    print("| variant | step ms | tokens/s | step vs bf16 | peak GiB | peak vs bf16 (teacher excluded) | spread | "
          "callback events ms/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        if "error" in r:
            print(f"| {LABELS[variant]} | {r['error']} | | | | | | |")
            continue
        t_ratio = f"{r['time'] / base['time']:.3f}x" if "time" in base else "-"
        m_ratio = f"{r['peak_ex'] / base['peak']:.3f}x" if base.get("peak") else "-"
        print(f"| {LABELS[variant]} | {r['time'] * 1e3:.1f} | {tokens / r['time']:,.0f} | {t_ratio} | "
              f"{r['peak'] / 2**30:.2f} | {m_ratio} | {r['spread']:.1%} | {r['callback'] * 1e3:.2f} |")
    print(f"\ncommand: {command}")


if __name__ == "__main__":
    main()
