"""bench/profile_qat_step.py and bench/profile_host_costs.py on the CPU: both variants train through the Trainer and
print their profile; the host-cost profile times each piece."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "profile_qat_step.py"


def test_profiles_a_plain_and_a_qat_step_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    summaries = re.findall(r"=== (\w+)\n\s+wall ([\d.]+) ms/step \(profiled\), GPU kernels 0.0 ms/step", out)
    assert [name for name, _ in summaries] == ["plain", "hfqat"]
    assert all(float(ms) > 0 for _, ms in summaries)
    assert "aten::mm" in out  # the operator table follows each summary


def test_unknown_variant_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--variants", "bf16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "allowed values: plain, hfqat" in proc.stderr


def test_host_costs_profile_prints_every_piece_on_cpu():
    script = SCRIPT.parent / "profile_host_costs.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    pieces = dict(re.findall(r"^  (.+?)\s+([\d.]+) / +[\d.]+$", out, re.M))
    assert {"plain: forward + backward", "hfqat (bucketed fake quant): forward + backward",
            "fake-quant weights, bucketed (forward)", "teacher forward, eager"} <= pieces.keys()
    assert all(float(ms) > 0 for ms in pieces.values())
