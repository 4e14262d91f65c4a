"""Where QATCallback's own time goes: process time (CPU) or wall time (CUDA, synchronised around each part) inside
each of its parts over the `bench_qat_speed.py` amortised run of one variant (warm-up through the first
re-allocation + one interval), with how many times each part ran and, with ``--ops``, how many aten operations it
dispatched (on a GPU each is at least one kernel launch: a part with many small ones is launch-bound). Parts nest
(a re-allocation holds its calibration, score read, solve, apply and clip re-fit): the rows are not to be summed.

Run (GPU, the 1B shape): python bench/profile_callback_parts.py [--variant hfqat+callback] [bench_qat_speed.py shape
options] [--ops]
CPU: OMP_NUM_THREADS=1 python bench/profile_callback_parts.py --device cpu --hidden 128 --inter 384 --layers 4
--heads 4 --kv-heads 2 --vocab 1024 --seq 128 --batch 8
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench_qat_speed as bench
from hfqat.quant import layers as quant_layers
from hfqat.train import allocator, calibration, grid_updates, history, reallocation, tracker

PARTS = [  # (owner, attribute, label); nested parts are listed under the part that holds them
    (reallocation.Reallocation, "_reallocate", "re-allocation (all of it)"),
    (allocator.LayerAllocator, "measure", "  calibration measure (kinds x widths + 1 forwards)"),
    (calibration, "candidate_weight", "    calibration: candidate weights"),
    (tracker.SensitivityTracker, "shared_scores", "  read scores (Fisher: weigh by errors; rank mean)"),
    (tracker.SensitivityTracker, "flush", "    Fisher: weigh by quantization errors"),
    (allocator.LayerAllocator, "_costs", "  calibrate the costs"),
    (allocator.LayerAllocator, "_solve", "  allocate_tied_bits (DP)"),
    (allocator.RowAllocator, "choose_rows", "  allocate_unit_bits (Lagrangian) and rescaling"),
    (allocator.LayerAllocator, "apply", "  set_bits (scale re-fit of the layers that move)"),
    (quant_layers.FakeQuantMixin, "reset_quant_params", "    reset_quant_params (MSE scale search)"),
    (allocator.RowAllocator, "apply_rows", "  set_row_bits (scale re-fit of the rows that move)"),
    (tracker.SensitivityTracker, "refit_clip", "  clip-ratio re-fit"),
    (history.AllocationHistory, "record", "  history record"),
    (grid_updates.GridStepUpdates, "refresh", "grid updates: refresh (after a re-allocation)"),
    (grid_updates.GridStepUpdates, "before_step", "grid updates: copy before the optimizer step"),
    (grid_updates.GridStepUpdates, "after_step", "grid updates: scale the update"),
    (tracker.SensitivityTracker, "observe_step", "per-step observation (Fisher: fold g²)"),
    (allocator.RowAllocator, "first_allocation", "first per-row allocation (gradient prior)"),
]


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active (outer counters see the ops of inner ones too)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="hfqat+callback", choices=bench.AMORTISED)
    for name, default in (("hidden", 2048), ("inter", 8192), ("layers", 16), ("heads", 32), ("kv-heads", 8),
                          ("vocab", 32000), ("seq", 2048), ("batch", 8), ("steps", 10), ("warmup", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ops", action="store_true", help="count aten operations per part (slows every part)")
    args = parser.parse_args()
    args.profile = False
    cuda = args.device == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    spent: dict[str, list[float]] = {}  # label -> [seconds, calls, ops]

    def timed(function, label):
        def run(*a, **k):
            if cuda:
                torch.cuda.synchronize()
            counter = OpCounter() if args.ops else None
            start = clock()
            try:
                if counter is None:
                    return function(*a, **k)
                with counter:
                    return function(*a, **k)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                record = spent.setdefault(label, [0.0, 0, 0])
                record[0] += clock() - start
                record[1] += 1
                record[2] += counter.ops if counter is not None else 0
        return run

    for owner, attribute, label in PARTS:
        if attribute in vars(owner):  # own attributes only: an inherited method is timed on its base class
            setattr(owner, attribute, timed(getattr(owner, attribute), label))
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device,
                          generator=torch.Generator(device=args.device).manual_seed(0))
    result = bench.run_variant(args.variant, args, batch)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{args.variant}: mean step {result['time'] * 1e3:.1f} ms, callback events {result['callback'] * 1e3:.2f} "
          f"ms/step over the timed interval; parts over the whole run (warm-up interval included):")
    print(f"  {'part':<58} {'ms':>8} {'calls':>6}" + (f" {'aten ops':>9}" if args.ops else ""))
    for _, _, label in PARTS:
        if label in spent:
            seconds, calls, ops = spent[label]
            print(f"  {label:<58} {seconds * 1e3:8.0f} {calls:6d}" + (f" {ops:9d}" if args.ops else ""))


if __name__ == "__main__":
    main()
