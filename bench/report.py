"""Gather one results report: run the benchmark scripts, keep each one's printed tables and command.

    python bench/report.py --out bench-report            # the CPU-sized set (about 20 min on 2 cores)
    python bench/report.py --out bench-report --gpu      # + GPU speed, decode and full-size quality runs
    python bench/report.py --out bench-report --include bench/results   # + saved outputs of earlier GPU runs

Writes ``<out>/REPORT.md`` (every section: the exact command, then what the script printed) and copies the
PNG figures the scripts wrote (``<out>/figures/``). ``--include DIR`` appends every text/markdown file of DIR as
a section (verbatim: saved script outputs, each with its command) and its PNGs as figures. A script that fails is reported with its exit code and
the tail of its output; the rest still runs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

CPU_RUNS = [
    ("Fake-quant overhead and RTN init (min/max vs MSE)", ["bench_fake_quant.py"]),
    ("Packed size vs bf16", ["bench_size.py", "--smollm2"]),
    ("Bit allocators without training (PTQ perplexity)", ["bench_allocation.py"]),
    ("LoRA + QAT vs full QAT: memory and step time", ["bench_lora_memory.py"]),
    ("Quality: FP / RTN / QAT / KD / re-allocation / soft (short CPU run)",
     ["bench_qat_quality.py", "--cpu", "--only", "fast", "--steps", "20", "--batch", "2", "--seq-len", "256",
      "--eval-blocks", "8", "--memory-steps", "0", "--out", "{out}/quality"]),
]
GPU_RUNS = [
    ("QAT step time and memory vs bf16, torchao peer (1B Llama, GPU)", ["bench_qat_speed.py"]),
    ("Batch-1 decode and batch-16 prefill, 8B-Llama shape (GPU)", ["bench_decode.py", "--device", "cuda"]),
    ("Quality, full-size run (GPU)", ["bench_qat_quality.py", "--steps", "150", "--batch", "8", "--seq-len", "512",
                                      "--lr", "5e-5", "--out", "{out}/quality-gpu"]),
]


def run(title: str, args: list[str], out: Path) -> str:
    argv = [sys.executable, str(BENCH / args[0]), *(a.format(out=out) for a in args[1:])]
    command = shlex.join(["python", f"bench/{args[0]}", *argv[2:]])
    print(f"[report] {title}: {command}", flush=True)
    started = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.time() - started
    body = proc.stdout if proc.returncode == 0 else (proc.stdout + proc.stderr)[-4000:]
    status = "" if proc.returncode == 0 else f"\n**failed with exit code {proc.returncode}**\n"
    return f"## {title}\n\n`{command}` ({elapsed / 60:.1f} min){status}\n\n{body.strip()}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-report")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU benchmarks")
    parser.add_argument("--include", type=Path, help="folder of saved outputs (e.g. bench/results) to embed")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [run(title, cmd, out) for title, cmd in CPU_RUNS + (GPU_RUNS if args.gpu else [])]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    if args.include:
        for path in sorted(args.include.glob("*.txt")) + sorted(args.include.glob("*.md")):
            body = path.read_text().strip()
            if path.suffix == ".txt":  # plain script output: keep its columns
                body = f"```\n{body}\n```"
            sections.append(f"## Saved: {path.name}\n\n{body}\n")
        for png in args.include.glob("*.png"):
            shutil.copy(png, figures / png.name)
    for png in out.rglob("*.png"):
        if figures not in png.parents:
            shutil.copy(png, figures / f"{png.parent.name}-{png.name}")
    links = "\n".join(f"![{p.stem}](figures/{p.name})" for p in sorted(figures.glob("*.png")))
    report = "# hfqat benchmark report\n\n" + "\n".join(sections) + ("\n## Figures\n\n" + links if links else "")
    (out / "REPORT.md").write_text(report)
    print(f"[report] wrote {out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
