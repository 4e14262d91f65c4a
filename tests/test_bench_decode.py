"""bench/bench_decode.py's CPU smoke mode runs the whole user path (QATConfig → save_packed → from_pretrained →
generate) for bf16, a uniform and a per-row mixed variant, the prefill and the kernel table, and writes its JSON;
``--check``: the hand-written decode loop equals transformers' greedy generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "bench_decode.py"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_smoke_run_measures_every_variant(tmp_path):
    proc = _run("--device", "cpu", "--smoke", "--widths", "bf16,w4,mixed", "--backends", "ours",
                "--workdir", str(tmp_path), "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "bench_decode.json").read_text())
    for spec in ("bf16", "w4", "mixed"):
        assert results["generate"][spec]["eager"]["tokens_per_s"] > 0
        assert len(results["generate"][spec]["eager"]["first_tokens"]) == 8
        assert set(results["prefill"][spec]) == {"2x16", "1x64"}
    assert results["generate"]["w4"]["eager"]["weights_GB"] < results["generate"]["bf16"]["eager"]["weights_GB"] / 3
    assert results["checks"]["mixed"]["logits_rel_err_vs_exact"] < 1e-2
    assert results["kernels"]["256x512"]["mixed345 hfqat"]["M=1"]["us"] > 0
    assert "| mixed |" in proc.stdout and not results["skipped"]
    assert not any(p.name.startswith("hfqat_bench_") for p in tmp_path.iterdir())  # checkpoints cleaned up


def test_hand_loop_equals_generate(tmp_path):
    proc = _run("--check", tmp_path=tmp_path)
    assert proc.returncode == 0 and "check ok" in proc.stdout, proc.stderr[-3000:]
