"""Reliability probes (issue 24): no silent wrong results from bad input, damaged files or killed saves.

Each test replays what a user (or a crash) does and asserts the loud, named outcome: killed saves leave the old or the
new complete checkpoint and no debris after the next save; damaged checkpoints fail naming the file or layer;
non-finite weights are caught at conversion and at export; skip lists keep the head; typos warn; bad configs and
recipes raise `ValueError` naming the field.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.cli.main import main
from hfqat.cli.recipe import RecipeError, load_recipe
from hfqat.quant.modeling import bit_allocation, qat_layers

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
QCFG = dict(group_size=32)


def _qat(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(**{**QCFG, **kw}))


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- killed saves -----------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time
    import hfqat, hfqat.export.packed as packed
    from transformers import AutoModelForCausalLM
    src, target, mode = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=hfqat.QATConfig(group_size=32))
    if mode == "pause":  # stop for good once the new content is written, before it takes the target's place
        write = packed._write_checkpoint
        def write_then_wait(*args):
            write(*args)
            print("written", flush=True)
            time.sleep(600)
        packed._write_checkpoint = write_then_wait
    while True:
        hfqat.save_packed(model, target)
        print("saved", flush=True)
""")


def _start_saver(src: Path, target: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(target), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def _kill_after(proc: subprocess.Popen, line: str, delay: float = 0.0) -> None:
    for got in proc.stdout:
        if got.strip() == line:
            break
    else:
        raise AssertionError(f"the saving process ended (rc={proc.wait()}) before printing {line!r}")
    if delay:
        import time

        time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def packed_reference(tiny_model_dir, tmp_path_factory):
    """(float source, a QAT model of it, the bytes save_packed writes for it)."""
    src = tiny_model_dir("llama")
    model = _qat(src)
    ref = tmp_path_factory.mktemp("ref") / "packed"
    hfqat.save_packed(model, ref)
    return src, model, _contents(ref)


def test_save_killed_after_writing_leaves_old_checkpoint_and_next_save_removes_debris(packed_reference, tmp_path):
    src, model, expected = packed_reference
    target = tmp_path / "packed"
    hfqat.save_packed(model, target)
    _kill_after(_start_saver(src, target, "pause"), "written")
    assert _contents(target) == expected  # the old checkpoint, untouched
    assert _siblings(target), "the killed save should have left its temporary folder"
    hfqat.save_packed(model, target)
    assert _siblings(target) == []  # removed by the next save of the same target
    assert _contents(target) == expected


@pytest.mark.parametrize("trial", range(3))
def test_save_killed_at_a_random_time_leaves_a_complete_checkpoint(packed_reference, tmp_path, trial):
    src, model, expected = packed_reference
    target = tmp_path / "packed"
    proc = _start_saver(src, target, "loop")
    _kill_after(proc, "saved", delay=random.Random(trial).uniform(0.0, 0.3))
    assert _contents(target) == expected  # old or new, both complete (every save writes the same bytes)
    hfqat.save_packed(model, target)
    assert _siblings(target) == [] and _contents(target) == expected
    assert AutoModelForCausalLM.from_pretrained(target) is not None


def test_leftovers_of_running_writers_are_kept(tmp_path, caplog):
    target = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = __import__("socket").gethostname()
    dead = tmp_path / f".out.tmp-{done.stdout.strip()}@{host}-abc123"
    legacy = tmp_path / ".out.old-1a2b3c4d"  # written by an hfqat without owner tags
    live = tmp_path / f".out.tmp-{os.getpid()}@{host}-def456"  # e.g. another thread of this process saving now
    other = tmp_path / ".other.tmp-1@x-abc"  # another target's
    for folder in (dead, legacy, live, other):
        folder.mkdir()
    from hfqat.atomic import atomic_directory, leftover_siblings

    assert set(leftover_siblings(target)) == {dead, legacy}
    with caplog.at_level("WARNING", logger="hfqat.atomic"), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert "removed 2 leftover folder(s)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out"])
    assert (target / "a.txt").read_text() == "new"


# -- damaged checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(packed_reference, tmp_path_factory):
    """{"packed": folder, "fake_quant": folder} of the same model."""
    _, model, _ = packed_reference
    root = tmp_path_factory.mktemp("saved")
    hfqat.save_packed(model, root / "packed")
    model.save_pretrained(root / "fake_quant")
    return {"packed": root / "packed", "fake_quant": root / "fake_quant"}


def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize("fmt", ["packed", "fake_quant"])
@pytest.mark.parametrize("damage", ["truncated", "emptied", "header overwritten"])
def test_damaged_weights_file_is_named(saved, tmp_path, fmt, damage):
    folder = _copy(saved[fmt], tmp_path / fmt)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "emptied":
        data = bytearray()
    else:
        data[12:40] = b"#" * 28
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint file '{weights}' is damaged"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("fmt,key", [("packed", "scales"), ("fake_quant", "weight_scale"), ("fake_quant", "weight")])
def test_non_finite_values_in_a_saved_checkpoint_are_named(saved, tmp_path, fmt, key):
    folder = _copy(saved[fmt], tmp_path / fmt)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    tensors[f"{name}.{key}"].view(-1)[:2] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}: 2 NaN and 0 inf"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_packed_checkpoint_without_quantization_config_does_not_load_as_random_float(saved, tmp_path):
    folder = _copy(saved["packed"], tmp_path / "packed")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_packed_checkpoint_without_import_hfqat_fails_loudly(saved):
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(saved['packed'])!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0, "a packed checkpoint loaded as a plain model without hfqat"
    assert "hfqat_packed_checkpoint.load_after_import_hfqat" in run.stderr + run.stdout


# -- non-finite weights -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    from conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, :3] = float("nan")
        model.model.layers[0].self_attn.q_proj.weight[1, 1] = float("inf")
    path = tmp_path_factory.mktemp("nan")
    model.save_pretrained(path)
    return path


def test_non_finite_weights_raise_at_conversion_naming_layer_and_count(nan_model_dir):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: 0 NaN and 1 inf; "
                                         r"model\.layers\.1\.mlp\.down_proj: 3 NaN and 0 inf"):
        _qat(nan_model_dir)
    model = AutoModelForCausalLM.from_pretrained(nan_model_dir)
    with pytest.raises(ValueError, match=r"down_proj: 3 NaN"):
        hfqat.quantize_model(model, hfqat.QATConfig(**QCFG))


def test_non_finite_skip_keeps_those_layers_float_and_reloads(nan_model_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="hfqat"):
        model = _qat(nan_model_dir, non_finite="skip")
    skipped = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert "model.layers.1.mlp.down_proj: 3 NaN and 0 inf" in caplog.text
    assert skipped.isdisjoint(dict(qat_layers(model))) and len(list(qat_layers(model))) == 12
    assert type(model.get_submodule("model.layers.1.mlp.down_proj")) is torch.nn.Linear
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert set(dict(qat_layers(reloaded))) == set(dict(qat_layers(model)))
    with pytest.raises(ValueError, match="non_finite"):
        hfqat.QATConfig(non_finite="ignore")


def test_non_finite_expert_weights_raise_or_stay_float(tmp_path):
    from moe_archs import tiny_moe_config

    from hfqat.quant.experts import qat_experts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config("mixtral"))
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.view(-1)[:5] = float("nan")
    model.save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: 5 NaN and 0 inf"):
        _qat(tmp_path / "float")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the recorded skip entry names a parameter that exists
        model = _qat(tmp_path / "float", non_finite="skip")
    quantized = {name: sorted(m.quantizers) for name, m in qat_experts(model)}
    assert quantized == {"model.layers.0.mlp.experts": ["down_proj"],
                         "model.layers.1.mlp.experts": ["down_proj", "gate_up_proj"]}
    model.save_pretrained(tmp_path / "qat")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    assert {name: sorted(m.quantizers) for name, m in qat_experts(reloaded)} == quantized


def test_save_packed_refuses_non_finite_weights_naming_the_layer(packed_reference, tmp_path):
    model = _qat(packed_reference[0])  # a model of its own: the shared one stays finite
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cannot pack non-finite.*model\.layers\.0\.mlp\.up_proj: 1 NaN"):
        hfqat.save_packed(model, tmp_path / "out")
    with torch.no_grad():
        layer.weight[0, 0] = 0.0
        layer.weight_scale[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: 0 NaN and 1 inf"):
        hfqat.save_packed(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


# -- what is converted ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip", [[], ["everything"], ["o_proj"]])
def test_modules_to_not_convert_adds_to_the_default_head_skip(tiny_model_dir, skip):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _qat(tiny_model_dir("llama"), modules_to_not_convert=skip)
    assert type(model.lm_head) is torch.nn.Linear
    converted = set(bit_allocation(model))
    assert any(name.endswith("o_proj") for name in converted) == ("o_proj" not in skip)
    unmatched = [str(w.message) for w in caught if "matches no module" in str(w.message)]
    assert len(unmatched) == (1 if skip == ["everything"] else 0)


def test_head_is_converted_when_layer_bits_names_it(tiny_model_dir):
    model = _qat(tiny_model_dir("llama"), layer_bits={"lm_head": 8})
    assert bit_allocation(model)["lm_head"] == 8
    assert "lm_head" not in bit_allocation(_qat(tiny_model_dir("llama"), layer_bits={".*": 3}))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    hfqat.quantize_model(model, hfqat.QATConfig(**QCFG, modules_to_not_convert=["o_proj"]))
    assert type(model.lm_head) is torch.nn.Linear


def test_patterns_matching_nothing_warn_with_the_closest_names(tiny_model_dir):
    with pytest.warns(UserWarning, match=r"layer_bits entry 'down_prj' matches no module.*'down_proj'"):
        model = _qat(tiny_model_dir("llama"), layer_bits={"down_prj": 8})
    assert set(bit_allocation(model).values()) == {4}
    with pytest.warns(UserWarning, match=r"modules_to_not_convert entry 'model.layers.0.mlp.gate_prj' matches no "
                                         r"module.*'model.layers.0.mlp.gate_proj'"):
        _qat(tiny_model_dir("llama"), modules_to_not_convert=["model.layers.0.mlp.gate_prj"])


# -- bad configs and recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(bits="4"), "bits"), (dict(group_size=1.5), "group_size"), (dict(modules_to_not_convert=5),
                                                                     "modules_to_not_convert"),
    (dict(layer_bits={1: 4}), "layer_bits"), (dict(layer_bits={"q_proj": "8"}), "layer_bits"),
    (dict(packed_layers=5, checkpoint_format="packed"), "packed_layers"), (dict(non_finite=None), "non_finite"),
])
def test_config_type_errors_are_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QATConfig\.{field}"):
        hfqat.QATConfig(**kwargs)


def test_malformed_recipe_is_a_recipe_error(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("quant: {bits: 4\ntraining: [")
    with pytest.raises(RecipeError, match=r"r\.yaml' is not valid YAML"):
        load_recipe(bad)
    (tmp_path / "r.json").write_text("{'quant': 1}")
    with pytest.raises(RecipeError, match="is not valid JSON"):
        load_recipe(tmp_path / "r.json")


def test_missing_model_path_and_train_file_are_reported_before_loading(tmp_path, monkeypatch, capsys):
    import hfqat.cli.main as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was reported")

    monkeypatch.setattr(cli, "load_model", no_loading)
    assert main(["train", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "model.model=" in capsys.readouterr().err
    assert main(["train", "--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "o")]) == 2
    assert f"data.train_file: data file '{tmp_path / 'missing.txt'}' does not exist" in capsys.readouterr().err
    assert main(["train", "--bits", "9", "--output_dir", str(tmp_path / "o")]) == 2
    assert "QATConfig.bits=9" in capsys.readouterr().err


def test_model_folder_without_tokenizer_files_says_so(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir("llama"))]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "sentencepiece" not in err
