"""`CheckpointStore`: a resumed run reads the teacher and per-row sensitivities from the checkpoint it resumes (a
copied run reads its own files) and a damaged file there raises a ValueError naming it (issue 24, item 1)."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import text_dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hfqat
from hfqat.train.callback import ROW_SCORES_FILE, TEACHER_FILE, QATCallback

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, SAVE = 4, 2


def _callback():
    return QATCallback(budget_bits=3.0, reallocate_every=2, write_plots=False)


def _train(model_dir, out, callbacks, granularity="layer", resume=None):
    config = hfqat.QATConfig(bits=4, group_size=32, bits_granularity=granularity)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=4, save_strategy="steps",
                             save_steps=SAVE, report_to=[], learning_rate=1e-3, use_cpu=True, disable_tqdm=True,
                             seed=0, logging_steps=STEPS)
    Trainer(model=model, args=args, train_dataset=text_dataset(16), callbacks=callbacks).train(
        resume_from_checkpoint=resume)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A per-layer and a per-row run, each saved at step SAVE."""
    root = tmp_path_factory.mktemp("runs")
    for granularity in ("layer", "row"):
        _train(tiny_model_dir("llama"), root / granularity, [_callback()], granularity)
    return root


def _copy(runs, granularity, tmp_path):
    copy = tmp_path / f"{granularity}-copy"
    shutil.copytree(runs / granularity, copy, symlinks=True)
    return copy


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_resume_of_a_copy_distills_from_the_copys_teacher(tiny_model_dir, runs, tmp_path):
    copy = _copy(runs, "layer", tmp_path)
    teacher_file = copy / f"checkpoint-{SAVE}" / TEACHER_FILE
    changed = {key: value * 2 for key, value in load_file(teacher_file).items()}  # valid, and not the original's
    save_file(changed, teacher_file)
    callback, seen = _callback(), []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(dict(callback._hook.teacher.tensors))

    _train(tiny_model_dir("llama"), copy, [callback, Probe()], resume=str(copy / f"checkpoint-{SAVE}"))
    assert seen and seen[0].keys() == changed.keys()
    assert all(torch.equal(seen[0][key], changed[key]) for key in changed)


@pytest.mark.parametrize("granularity, filename", [("layer", TEACHER_FILE), ("row", TEACHER_FILE),
                                                   ("row", ROW_SCORES_FILE)])
@pytest.mark.parametrize("original", ["kept", "moved away"])
def test_a_damaged_file_in_the_resumed_checkpoint_is_named(tiny_model_dir, runs, tmp_path, granularity, filename,
                                                           original):
    copy = _copy(runs, granularity, tmp_path)
    damaged = copy / f"checkpoint-{SAVE}" / filename
    _truncate(damaged)
    source, away = runs / granularity, runs / f"{granularity}-away"
    if original == "moved away":
        source.rename(away)
    try:
        with pytest.raises(ValueError, match=re.escape(str(damaged))):
            _train(tiny_model_dir("llama"), copy, [_callback()], granularity,
                   resume=str(copy / f"checkpoint-{SAVE}"))
    finally:
        if original == "moved away":
            away.rename(source)


def test_a_teacher_of_another_model_is_refused_naming_the_file(tiny_model_dir, runs, tmp_path):
    copy = _copy(runs, "layer", tmp_path)
    teacher_file = copy / f"checkpoint-{SAVE}" / TEACHER_FILE
    save_file({key: value[:1] for key, value in load_file(teacher_file).items()}, teacher_file)
    with pytest.raises(ValueError, match=re.escape(str(teacher_file)) + ".*does not fit this model"):
        _train(tiny_model_dir("llama"), copy, [_callback()], resume=str(copy / f"checkpoint-{SAVE}"))


def test_resumed_checkpoint_without_a_trainer():
    from hfqat.train.state_store import resumed_checkpoint

    state = SimpleNamespace(global_step=7)
    assert resumed_checkpoint(SimpleNamespace(output_dir="out", resume_from_checkpoint=None), state) == \
        "out/checkpoint-7"  # Trainer's naming
    assert resumed_checkpoint(SimpleNamespace(output_dir="out", resume_from_checkpoint="elsewhere/ck"), state) == \
        "elsewhere/ck"
    assert resumed_checkpoint(SimpleNamespace(output_dir="out"), SimpleNamespace(global_step=0)) is None


def test_read_safetensors_names_a_damaged_file(tmp_path):
    from hfqat.train.state_store import read_safetensors

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(64)}, path)
    assert torch.equal(read_safetensors(path, "test tensors")["a"], torch.ones(64))
    _truncate(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_safetensors(path, "test tensors")
