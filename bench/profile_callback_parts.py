"""Where QATCallback's own time goes: process time (CPU) or wall time (CUDA, synchronised) inside each of its parts
over the `bench_qat_speed.py` amortised run of one variant (warm-up through the first re-allocation + one interval).

Run: python bench/profile_callback_parts.py [--variant hfqat+callback] [bench_qat_speed.py shape options]
CPU: OMP_NUM_THREADS=1 python bench/profile_callback_parts.py --device cpu --hidden 128 --inter 384 --layers 4
--heads 4 --kv-heads 2 --vocab 1024 --seq 128 --batch 8
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import bench_qat_speed as bench
from hfqat.train import allocator, tracker

PARTS = [  # (owner, method, label)
    (allocator.LayerAllocator, "measure", "calibration measure (kinds x widths + 1 forwards)"),
    (allocator.LayerAllocator, "apply", "set_bits (scale re-fit of the layers that move)"),
    (allocator.RowAllocator, "apply_rows", "set_row_bits (scale re-fit of the rows that move)"),
    (allocator.RowAllocator, "first_allocation", "first per-row allocation (gradient prior)"),
    (allocator, "allocate_bits", "allocate_bits (DP)"),
    (allocator, "allocate_unit_bits", "allocate_unit_bits (Lagrangian)"),
    (tracker.SensitivityTracker, "refit_clip", "clip-ratio re-fit"),
    (tracker.SensitivityTracker, "observe_step", "per-step observation (Fisher: fold g²)"),
    (tracker.SensitivityTracker, "flush", "Fisher: weigh by quantization errors"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="hfqat+callback", choices=bench.AMORTISED)
    for name, default in (("hidden", 2048), ("inter", 8192), ("layers", 16), ("heads", 32), ("kv-heads", 8),
                          ("vocab", 32000), ("seq", 2048), ("batch", 8), ("steps", 10), ("warmup", 3)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.profile = False
    cuda = args.device == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    spent: dict[str, float] = {}

    def timed(function, label):
        def run(*a, **k):
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            try:
                return function(*a, **k)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                spent[label] = spent.get(label, 0.0) + clock() - start
        return run

    for owner, method, label in PARTS:
        if method in vars(owner):  # own methods only: an inherited one is timed on its base class
            setattr(owner, method, timed(getattr(owner, method), label))
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device,
                          generator=torch.Generator(device=args.device).manual_seed(0))
    result = bench.run_variant(args.variant, args, batch)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{args.variant}: mean step {result['time'] * 1e3:.1f} ms, callback events {result['callback'] * 1e3:.2f} "
          f"ms/step over the timed interval; parts over the whole run (warm-up interval included):")
    for label, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {label}: {seconds * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
