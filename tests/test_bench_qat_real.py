"""bench/bench_qat_real.py in its smoke mode: every kind of row runs through the public API and reports."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_qat_real.py"
ROWS = "fp,fp-train,w4-1e-5,torchao-w4-1e-5,mixed3.5-row"


@pytest.fixture(scope="module")
def bench():
    if not Path("/usr/share/common-licenses/GPL-3").exists():  # pragma: no cover
        pytest.skip("the held-out licence texts are not on this machine")
    spec = importlib.util.spec_from_file_location("bench_qat_real", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def table_rows(output: str) -> dict[str, list[str]]:
    """Row name -> cells of the final table (the one printed after every row ran)."""
    final = output.rsplit("| row |", 1)[1]
    return {cells[0]: cells[1:] for line in final.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]] if cells[0] != "---"}


def ppl_pair(cell: str) -> tuple[float, float]:
    before, after = (float(x) for x in re.findall(r"[\d.]+", cell))
    return before, after


def test_smoke_rows_train_and_report(bench, capsys):
    assert bench.main(["--smoke", "--rows", ROWS]) == 0
    out = capsys.readouterr().out
    assert out.startswith("command: python bench/bench_qat_real.py --smoke")
    rows = table_rows(out)
    assert set(rows) == set(ROWS.split(","))
    fp = float(rows["fp"][5])
    assert math.isfinite(fp) and fp > 1
    for name in ("fp-train", "w4-1e-5", "mixed3.5-row"):
        lr, bits, wall, step = rows[name][:4]
        assert float(wall) > 0 and float(step) > 0
        before, after = ppl_pair(rows[name][5])
        assert math.isfinite(after) and after != before  # training changed the model
    assert ppl_pair(rows["fp-train"][5])[0] == fp  # a plain fine-tune starts from the FP model
    assert ppl_pair(rows["w4-1e-5"][5])[0] != fp  # a quantized one from its quantizer
    assert float(rows["mixed3.5-row"][1]) == pytest.approx(3.5, abs=0.01)
    assert rows["mixed3.5-row"][7] == ""  # its baseline row (w4-5e-5) did not run: no ratio
    torchao = rows["torchao-w4-1e-5"]
    if bench.torchao_available() is None:
        assert math.isfinite(ppl_pair(torchao[5])[1])
    else:
        assert torchao[5] == "torchao not installed"


def test_torchao_rows_say_when_torchao_is_absent(bench, capsys, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "torchao"] + ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing torchao (or a part) now raises ImportError
    assert bench.main(["--smoke", "--rows", "torchao-w4-1e-5"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["torchao-w4-1e-5"][5] == "torchao not installed"


def test_unknown_row_is_refused_with_the_allowed_names(bench):
    with pytest.raises(ValueError, match="allowed: .*'w4-1e-5'"):
        bench.main(["--smoke", "--rows", "w5"])
