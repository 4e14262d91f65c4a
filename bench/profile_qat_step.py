"""Where a QAT training step's time goes on a small model: plain fine-tune vs hfqat W4 + QATCallback, profiled (issue 26).

A random SmolLM2-135M-shaped Llama (30 layers, hidden 576, intermediate 1536, 9/3 heads, vocab 49152, tied
embeddings) saved to a temporary directory and loaded back in float32 as a user does (``from_pretrained``, with
``quantization_config=hfqat.QATConfig(bits=4, group_size=64, symmetric=True)`` for the hfqat variant), trained by the
stock `Trainer` on random tokens (8 x 512), ``QATCallback(reallocate_every=0, budget_bits=None)`` for hfqat (its
default teacher computes in float32 like the student), ``teacher_dtype="bfloat16"`` for hfqat-bf16-teacher and
``teacher=None`` for hfqat-no-teacher, ``teacher_cuda_graph=True`` for hfqat-graph-teacher (the teacher's forward
replayed as a CUDA graph, `hfqat.train.teacher_graph`), and hfqat-per-layer-fq quantizes each layer's weight in its
own forward (`hfqat.quant.batched_fake_quant` off). Steps 5-24 are timed unprofiled (their median is compared with the
plain step's at the end), steps 25-27 run under torch.profiler; printed per step: wall time (inflated by the
profiler), the sum of GPU kernel durations, kernels launched, and the top operators and kernels by device time.
This says whether a step is GPU-bound or waits on the host; the end-to-end comparison is bench/bench_qat_real.py.

GPU: python bench/profile_qat_step.py --device cuda      (results quoted in bench/results/h200_s12_qat_real.md)
     python bench/profile_qat_step.py --device cuda --variants plain,hfqat,hfqat-bf16-teacher,hfqat-no-teacher
     (--sync-debug also lists where one step makes the host wait for the device)
CPU smoke (a tiny model):  python bench/profile_qat_step.py --device cpu
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hfqat
from hfqat.quant import batched_fake_quant

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
TINY = dict(SMOLLM2, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
# Timed from step 5, over 20 steps: in session 15 the median of steps 2-5 put a QAT step 41 ms behind the plain one
# that the profiled steps 6-8 did not show (early steps can still grow the allocator's pools).
SYNC_CHECKED, TIMED_FROM, PROFILED_FROM, PROFILED_STEPS = 1, 5, 25, 3
# QATCallback arguments of each hfqat variant (uniform widths: no re-allocation)
VARIANTS = {
    "plain": None,
    "hfqat": dict(reallocate_every=0, budget_bits=None),
    "hfqat-bf16-teacher": dict(reallocate_every=0, budget_bits=None, teacher_dtype="bfloat16"),
    "hfqat-no-teacher": dict(reallocate_every=0, budget_bits=None, teacher=None),
    "hfqat-graph-teacher": dict(reallocate_every=0, budget_bits=None, teacher_cuda_graph=True),
    "hfqat-per-layer-fq": dict(reallocate_every=0, budget_bits=None),  # every layer quantizes its own weight
}


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepProfiler(TrainerCallback):
    """Profiles `PROFILED_STEPS` optimizer steps from step `PROFILED_FROM` and prints the summary."""

    def __init__(self, device: torch.device, sync_debug: bool = False):
        self.device, self.prof, self.t0 = device, None, 0.0
        self.sync_debug, self._warnings, self._recorded = sync_debug, None, []
        self.step_s: list[float] = []  # unprofiled steps TIMED_FROM .. PROFILED_FROM - 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.sync_debug and state.global_step == SYNC_CHECKED and self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._recorded = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if TIMED_FROM <= state.global_step < PROFILED_FROM:
            self._sync()
            self.t0 = time.perf_counter()
        if state.global_step == PROFILED_FROM:
            self._sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            syncs = collections.Counter(f"{w.filename}:{w.lineno}" for w in self._recorded
                                        if "synchroniz" in str(w.message))
            print(f"  host-device synchronisations in step {SYNC_CHECKED}: {sum(syncs.values())}", flush=True)
            for where, count in syncs.most_common(10):
                print(f"    {count:4d} x {where}", flush=True)
            self._warnings = None
        if TIMED_FROM < state.global_step <= PROFILED_FROM:
            self._sync()
            self.step_s.append(time.perf_counter() - self.t0)
        if self.prof is None or state.global_step != PROFILED_FROM + PROFILED_STEPS:
            return
        self._sync()
        wall = (time.perf_counter() - self.t0) / PROFILED_STEPS
        self.prof.__exit__(None, None, None)
        kernels = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(e.device_time for e in kernels) / 1e3 / PROFILED_STEPS
        print(f"  wall {1e3 * wall:.1f} ms/step (profiled), GPU kernels {gpu_ms:.1f} ms/step, "
              f"{len(kernels) / PROFILED_STEPS:.0f} kernels/step", flush=True)
        key = "self_device_time_total" if kernels else "self_cpu_time_total"
        print(self.prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70), flush=True)
        self.prof = None


def run(variant: str, checkpoint: str, device: torch.device, batch: int, seq: int, vocab: int,
        sync_debug: bool = False) -> float:
    """The variant's median unprofiled step time in seconds (and its profile, printed)."""
    print(f"=== {variant}", flush=True)
    qconfig = None if variant == "plain" else hfqat.QATConfig(bits=4, group_size=64, symmetric=True)
    batched_fake_quant.DEVICES = () if variant == "hfqat-per-layer-fq" else ("cuda",)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, quantization_config=qconfig)
    profiler = StepProfiler(device, sync_debug)
    callbacks: list[TrainerCallback] = [profiler]
    if VARIANTS[variant] is not None:
        callbacks.append(hfqat.QATCallback(**VARIANTS[variant], write_plots=False))
    ids = torch.randint(0, vocab, (8 * batch, seq), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=PROFILED_FROM + PROFILED_STEPS + 1,
                             per_device_train_batch_size=batch, learning_rate=5e-5, warmup_steps=2,
                             logging_steps=100, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                             use_cpu=device.type == "cpu")
    Trainer(model=model.to(device), args=args, train_dataset=TokenBlocks(ids), callbacks=callbacks).train()
    step = statistics.median(profiler.step_s)
    print(f"  unprofiled median step {1e3 * step:.1f} ms (steps {TIMED_FROM}-{PROFILED_FROM - 1})", flush=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda: the SmolLM2 shape, 8 x 512; cpu: a tiny model")
    parser.add_argument("--variants", default="plain,hfqat", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--sync-debug", action="store_true",
                        help=f"CUDA: list where step {SYNC_CHECKED} synchronises the host with the device")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"--variants: {variant!r} is unknown; allowed values: {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    shape, batch, seq = (SMOLLM2, 8, 512) if device.type == "cuda" else (TINY, 2, 64)
    checkpoint = tempfile.mkdtemp(prefix="hfqat_profile_")
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(checkpoint)
    steps = {variant: run(variant, checkpoint, device, batch, seq, shape["vocab_size"], args.sync_debug)
             for variant in variants}
    if "plain" in steps:
        for variant, step in steps.items():
            print(f"{variant}: {1e3 * step:.1f} ms/step unprofiled = {step / steps['plain']:.2f}x plain", flush=True)


if __name__ == "__main__":
    main()
