"""bench/profile_qat_step.py on the CPU: both variants train through the Trainer and print their profile."""

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
