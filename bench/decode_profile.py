"""Where a decode token's time goes: GPU kernel time against wall time, and how fast the linear layers' kernels
read their weights (bench/bench_decode.py ``--sections generate,profile``; issue 21).

One generate under torch.profiler (CPU + CUDA) gives every GPU activity's duration. Per token:

- ``kernel_ms``: GPU busy time, the sum of the kernels' (and copies') durations;
- ``gap_ms``: wall − kernel time, the time the GPU waits on the host (generate's Python loop, graph launches,
  host syncs); the wall is the timed, unprofiled generate's;
- ``linear_ms`` and ``linear_GBps``: the GEMV/GEMM kernels (told apart by name, `is_linear_kernel`) and the bytes
  they must read (the decoder's matrix weights as stored, plus the head) over their time, against the device's
  HBM peak (`HBM_PEAK_GBPS`, keyed by device name; ``None`` = unknown);
- ``ceiling_x``: bf16's wall over this variant's wall if its linear kernels read at the HBM peak and the gap and
  the other kernels stay as measured — the most a better kernel can give while the host overhead stays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch.autograd import DeviceType

# HBM bandwidth, GB/s, by a fragment of torch.cuda.get_device_name (datasheet figures)
HBM_PEAK_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "A100-SXM4-80GB": 2039.0}
# lower-case fragments of the names of the kernels that compute linear layers: cuBLAS (nvjet_*, *gemv*, *gemm*,
# cublasLt::splitKreduce_kernel finishing a split-K GEMM), tinygemm (tinygemm_m16n8k16_*), hfqat's Triton kernels
# (_gemv_kernel, _gemv_one_kernel, _gemm_kernel, _lut_gemv_kernel), gemlite (gemv_A16fWn*, gemm_splitK_*). An
# attention that falls back to cuBLAS batched GEMMs would count too; the static-cache decode uses cuDNN/flash SDPA.
LINEAR_KERNEL_MARKERS = ("gemv", "gemm", "nvjet", "splitkreduce")
# records that CUPTI files under the GPU but that are its own bookkeeping, not GPU work (kineto's names)
CUPTI_OVERHEAD = frozenset({"Buffer Flush", "Instrumentation", "Resource", "Driver Compiler",
                            "Lazy Function Loading", "Runtime Triggered Module Loading"})

Activity = tuple[str, float]  # (kernel name, microseconds)


def hbm_peak_gbps(device_name: str | None) -> float | None:
    """The HBM peak of the named device, or None when the table does not know it (CPU included)."""
    return next((peak for key, peak in HBM_PEAK_GBPS.items() if device_name and key in device_name), None)


def is_linear_kernel(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in LINEAR_KERNEL_MARKERS)


def gpu_activities(prof: torch.profiler.profile) -> list[Activity]:
    """(name, microseconds) of every GPU activity a finished profiler recorded; torch's own rule for "Self CUDA"
    time (device events that are not user annotations) less CUPTI's overhead records."""
    return [(e.name, e.device_time_total) for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation and e.name not in CUPTI_OVERHEAD]


def profiled(fn: Callable[[], object], cuda: bool, sync: Callable[[], None]) -> tuple[list[Activity], float]:
    """Run `fn` once under torch.profiler (CPU, and CUDA if `cuda`): (its GPU activities, its wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds = time.perf_counter() - start
    return gpu_activities(prof), seconds


def summarize(activities: Sequence[Activity], tokens: int, wall_ms: float, weight_bytes: int,
              peak_gbps: float | None, bf16_wall_ms: float | None) -> dict:
    """Per-token figures of one profiled generate of `tokens` new tokens (see the module docstring);
    `wall_ms` per token of the timed generate, `weight_bytes` the linear layers read per token."""
    row = {"wall_ms": wall_ms, "kernels_per_token": len(activities) / tokens, "peak_GBps": peak_gbps}
    if not activities:  # CPU run (or a profiler that saw no GPU)
        return row
    kernel_ms = sum(us for _, us in activities) / 1e3 / tokens
    linear_ms = sum(us for name, us in activities if is_linear_kernel(name)) / 1e3 / tokens
    row.update(kernel_ms=kernel_ms, gap_ms=wall_ms - kernel_ms, linear_ms=linear_ms,
               linear_GBps=weight_bytes / linear_ms / 1e6 if linear_ms else None)
    if peak_gbps and bf16_wall_ms:
        at_peak_ms = weight_bytes / peak_gbps / 1e6
        row["ceiling_x"] = bf16_wall_ms / (row["gap_ms"] + kernel_ms - linear_ms + at_peak_ms)
    return row


def describe(row: dict) -> str:
    """One line: where the time goes."""
    if "kernel_ms" not in row:
        return f"wall {row['wall_ms']:.2f} ms/token; no CUDA kernels profiled (no CUDA)"
    bandwidth = "-" if row["linear_GBps"] is None else f"{row['linear_GBps']:.0f} GB/s"
    if row["linear_GBps"] is not None and row["peak_GBps"]:
        bandwidth += f" ({row['linear_GBps'] / row['peak_GBps']:.0%} of {row['peak_GBps']:.0f})"
    ceiling = f"; ceiling x{row['ceiling_x']:.2f} vs bf16" if "ceiling_x" in row else ""
    return (f"wall {row['wall_ms']:.2f} = kernels {row['kernel_ms']:.2f} + gap {row['gap_ms']:.2f} ms/token "
            f"({row['kernels_per_token']:.0f} kernels); linear {row['linear_ms']:.2f} ms at {bandwidth}{ceiling}")


def table(profile: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown table of the rows, {variant: {mode: row}}."""
    lines = ["", "== where a token's time goes (profile, ms/token; gap = wall - GPU kernel time: the GPU waiting on "
                 "the host; linear = GEMV/GEMM kernels, GB/s = weights + head they read; ceiling = x vs bf16 "
                 "with linear kernels at HBM peak, gap as measured) ==",
             "| model | mode | wall | kernels | gap | kernels/token | linear | linear GB/s | % of peak | ceiling |",
             "|" + "---|" * 10]
    for spec, modes in profile.items():
        for mode, row in modes.items():
            if "kernel_ms" not in row:
                lines.append(f"| {spec} | {mode} | {row['wall_ms']:.2f} | no CUDA | - | - | - | - | - | - |")
                continue
            gbps, peak = row["linear_GBps"], row["peak_GBps"]
            ceiling = f"{row['ceiling_x']:.2f}x" if "ceiling_x" in row else "-"
            lines.append(f"| {spec} | {mode} | {row['wall_ms']:.2f} | {row['kernel_ms']:.2f} | {row['gap_ms']:.2f} | "
                         f"{row['kernels_per_token']:.0f} | {row['linear_ms']:.2f} | "
                         f"{'-' if gbps is None else f'{gbps:.0f}'} | "
                         f"{f'{gbps / peak:.0%}' if gbps and peak else 'unknown'} | {ceiling} |")
    return lines
