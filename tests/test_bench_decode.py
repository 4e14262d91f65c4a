"""bench/bench_decode.py's CPU smoke mode runs the whole user path (QATConfig → save_packed → from_pretrained →
generate) for bf16, a uniform and a per-row mixed variant, the prefill, the kernel table and the profile section,
and writes its JSON; ``--check``: the hand-written decode loop equals transformers' greedy generate. The profile
section's kernel classifier and per-token summary are checked on synthetic profiler events."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]


def _load_decode_profile():
    spec = importlib.util.spec_from_file_location("decode_profile", ROOT / "bench" / "decode_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decode_profile = _load_decode_profile()


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


def test_split_run_takes_bf16_from_a_baseline(tmp_path):
    assert _run("--device", "cpu", "--smoke", "--widths", "bf16", "--sections", "generate", "--out",
                str(tmp_path / "a"), tmp_path=tmp_path).returncode == 0
    proc = _run("--device", "cpu", "--smoke", "--widths", "w2", "--sections", "generate", "--out", str(tmp_path / "b"),
                "--baseline", str(tmp_path / "a" / "bench_decode.json"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "b" / "bench_decode.json").read_text())
    assert set(results["generate"]) == {"bf16", "w2"} and "| bf16 |" in proc.stdout
    assert any(line.startswith("| w2 |") and "x)" in line for line in proc.stdout.splitlines())  # a ratio vs bf16


def test_hand_loop_equals_generate(tmp_path):
    proc = _run("--check", tmp_path=tmp_path)
    assert proc.returncode == 0 and "check ok" in proc.stdout, proc.stderr[-3000:]


def test_profile_section_runs_on_cpu_and_says_no_cuda(tmp_path):
    proc = _run("--device", "cpu", "--smoke", "--widths", "bf16,w4", "--sections", "generate,profile",
                "--workdir", str(tmp_path), "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "bench_decode.json").read_text())
    for spec in ("bf16", "w4"):
        row = results["profile"][spec]["eager"]
        assert row["kernels_per_token"] == 0 and "kernel_ms" not in row and row["peak_GBps"] is None
        assert row["wall_ms"] == results["generate"][spec]["eager"]["ms_per_token"] and row["profiled_wall_ms"] > 0
        assert f"| {spec} | eager |" in proc.stdout
    assert "no CUDA" in proc.stdout and not results["errors"]


# kernel names as the profiler printed them in a static-cache generate on the H200 (and our / gemlite's Triton)
LINEAR_NAMES = ["nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT", "void cublasLt::splitKreduce_kernel<32, 16, int, float>",
                "void at::native::tinygemm_m16n8k16_chunk_kernel<at::native::KReductionType>", "_gemv_kernel",
                "_gemv_one_kernel", "_gemm_kernel", "_lut_gemv_kernel", "gemv_revsplitK_A16fWnO16f_int32packing_kernel",
                "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_nn"]
OTHER_NAMES = ["triton_poi_fused__to_copy__unsafe_view_add_arange_bmm_cat_cos_index_copy_8",
               "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_3_64x64x128_4x1x1_kernel0_0",
               "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_view_13", "Memcpy DtoH (Device -> Pinned)",
               "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>"]


@pytest.mark.parametrize("name", LINEAR_NAMES)
def test_linear_kernels_are_recognised(name):
    assert decode_profile.is_linear_kernel(name)


@pytest.mark.parametrize("name", OTHER_NAMES)
def test_other_kernels_are_not_linear(name):
    assert not decode_profile.is_linear_kernel(name)


def test_gpu_activities_keep_gpu_work_only():
    def event(name, device_type, us, annotation=False):
        return SimpleNamespace(name=name, device_type=device_type, device_time_total=us, is_user_annotation=annotation)

    prof = SimpleNamespace(events=lambda: [
        event("aten::mm", DeviceType.CPU, 50.0), event("nvjet_x", DeviceType.CUDA, 30.0),
        event("## Call CompiledFxGraph abc", DeviceType.CUDA, 900.0, annotation=True),  # spans the kernels below
        event("Buffer Flush", DeviceType.CUDA, 2000.0), event("Memcpy DtoH", DeviceType.CUDA, 2.0)])
    assert decode_profile.gpu_activities(prof) == [("nvjet_x", 30.0), ("Memcpy DtoH", 2.0)]


def test_summary_per_token_bandwidth_and_ceiling():
    # two tokens, each: a 1000 us GEMV over 2.4 GB (2400 GB/s) and a 200 us other kernel; wall 2 ms per token
    activities = [("nvjet_gemv", 1000.0), ("triton_poi_fused_mul", 200.0)] * 2
    row = decode_profile.summarize(activities, 2, 2.0, 2_400_000_000, 4800.0, 3.0)
    assert row["kernels_per_token"] == 2 and row["kernel_ms"] == pytest.approx(1.2)
    assert row["gap_ms"] == pytest.approx(0.8) and row["linear_ms"] == pytest.approx(1.0)
    assert row["linear_GBps"] == pytest.approx(2400.0)
    # at 4800 GB/s the GEMV takes 0.5 ms: 3.0 / (0.8 gap + 0.2 other + 0.5) = 2.0x
    assert row["ceiling_x"] == pytest.approx(2.0)
    assert "50% of 4800" in decode_profile.describe(row)
    unknown = decode_profile.summarize(activities, 2, 2.0, 2_400_000_000, None, 3.0)
    assert "ceiling_x" not in unknown and "| unknown | - |" in decode_profile.table({"w4": {"static": unknown}})[-1]
    cpu = decode_profile.summarize([], 8, 3.5, 1000, None, 3.5)
    assert cpu == {"wall_ms": 3.5, "kernels_per_token": 0.0, "peak_GBps": None}
    assert "no CUDA" in decode_profile.describe(cpu)


def test_hbm_peak_by_device_name():
    assert decode_profile.hbm_peak_gbps("NVIDIA H200") == 4800.0
    assert decode_profile.hbm_peak_gbps("NVIDIA GeForce RTX 4090") is None
    assert decode_profile.hbm_peak_gbps(None) is None
