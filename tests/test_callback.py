"""QATCallback under a stock Trainer: acceptance run, resume, annealing, freezing, estimators, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import text_dataset
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hfqat
from hfqat.quant.modeling import qat_layers
from hfqat.train.callback import HISTORY_FILE, TEACHER_FILE, QATCallback

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(path, **config):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=hfqat.QATConfig(**{"bits": 4, "group_size": 32, **config}))


def _args(out, **kw):
    base = dict(max_steps=30, per_device_train_batch_size=4, logging_steps=5, save_strategy="no", report_to=[],
                learning_rate=1e-3, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    return TrainingArguments(str(out), **{**base, **kw})


def _train(path, out, callback, resume=None, **kw):
    model = _model(path)
    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=text_dataset(64), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_acceptance_budget_and_resume(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    make = lambda: QATCallback(budget_bits=3.0, bit_choices=(2, 3, 4, 8), reallocate_every=5)
    out = tmp_path / "run"
    callback = make()
    model, trainer = _train(path, out, callback, save_strategy="steps", save_steps=15)

    final = hfqat.bit_allocation(model)
    assert len(set(final.values())) > 1
    assert hfqat.average_bits(model) <= 3.0
    assert [h["step"] for h in callback.history] == [0, 5, 10, 15, 20]  # frozen after 0.8 * 30 = 24
    assert all(h["average_bits"] <= 3.0 for h in callback.history)
    assert all(h["measured_kind_loss_increase"] for h in callback.history)  # calibrate=None: on for layers
    assert (out / "bit_allocation.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    saved = json.loads((out / HISTORY_FILE).read_text())
    assert saved["history"][-1]["bits"] == final
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert train_logs and all("distill_loss" in e and "task_loss" in e for e in train_logs)
    assert (out / "checkpoint-15" / TEACHER_FILE).is_file()

    # Resume from the mid-run checkpoint: same allocation sequence and the same final allocation.
    expected_history = [dict(h) for h in callback.history]
    resumed_callback = make()
    resumed, _ = _train(path, out, resumed_callback, resume=str(out / "checkpoint-15"),
                        save_strategy="steps", save_steps=15)
    assert resumed_callback.history == expected_history
    assert hfqat.bit_allocation(resumed) == final
    for (_, a), (_, b) in zip(qat_layers(model), qat_layers(resumed)):
        torch.testing.assert_close(a.weight_scale, b.weight_scale)


def test_no_arguments_runs_unchanged_trainer(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, logging_steps=2),
                      train_dataset=text_dataset(16), callbacks=[QATCallback()])
    trainer.train()
    assert any("distill_loss" in e for e in trainer.state.log_history)
    assert hfqat.average_bits(model) <= 4.0


def test_reallocation_keeps_parameter_identity(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"))
    scales = {name: layer.weight_scale for name, layer in qat_layers(model)}
    callback = QATCallback(teacher=None, budget_bits=3.0, reallocate_every=2, freeze_after=1.0)
    noted = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            noted.append(callback._estimator._bits == hfqat.bit_allocation(model))

    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6), train_dataset=text_dataset(32),
                      callbacks=[callback, Probe()])
    trainer.train()
    changed = [n for n in scales if any(h["bits"][n] != callback.history[0]["bits"][n] for h in callback.history)]
    assert changed, "expected some layer to change bits"
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, layer in qat_layers(model):
        assert layer.weight_scale is scales[name] and id(layer.weight_scale) in in_optimizer
    assert len(trainer.optimizer.param_groups) == len(trainer.create_optimizer().param_groups)
    # The estimator's record of the bits (read per step without a GPU sync) follows every change.
    assert noted and all(ok for ok in noted)


def test_soft_sharpness_anneals_to_exact(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"), rounding="soft", clamping="soft")
    layer = next(layer for _, layer in qat_layers(model))
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(layer.soft_sharpness)

    callback = QATCallback(teacher=None, reallocate_every=0, freeze_after=0.5, soft_anneal=(1.0, 100.0))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=8), train_dataset=text_dataset(32),
                      callbacks=[callback, Probe()])
    trainer.train()
    finite = [s for s in seen if math.isfinite(s)]
    assert finite == sorted(finite) and finite[0] == 1.0 and len(finite) == 4
    assert all(math.isinf(s) for s in seen[4:]) and math.isinf(layer.soft_sharpness)


@pytest.mark.parametrize("sensitivity", ["kfac", "hutchinson", "variance"])
def test_other_estimators_reallocate(tiny_model_dir, tmp_path, sensitivity):
    model = _model(tiny_model_dir("llama"))
    # calibrate=False: the prediction checked below is the estimator's own
    callback = QATCallback(budget_bits=3.5, reallocate_every=3, sensitivity=sensitivity, hysteresis=0.0,
                           calibrate=False)
    Trainer(model=model, args=_args(tmp_path, max_steps=6), train_dataset=text_dataset(32),
            callbacks=[callback]).train()
    assert [h["step"] for h in callback.history] == [0, 3]
    assert callback.history[-1]["predicted_loss_increase"] > 0
    assert hfqat.average_bits(model) <= 3.5


def test_state_is_json_and_reallocation_off(tiny_model_dir, tmp_path):
    callback = QATCallback(reallocate_every=0, teacher=None)
    model = _model(tiny_model_dir("llama"))
    before = hfqat.bit_allocation(model)
    Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=text_dataset(8),
            callbacks=[callback]).train()
    assert hfqat.bit_allocation(model) == before and callback.history == []
    state = json.loads(json.dumps(callback.state()))
    assert QATCallback(**state["args"]).reallocate_every == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(teacher=3), "teacher"),
    (dict(teacher_dtype="fp8"), "teacher_dtype"),
    (dict(replicate_teacher="yes"), "replicate_teacher"),
    (dict(distill_weight=1.5), "distill_weight"),
    (dict(temperature=0), "temperature"),
    (dict(budget_bits=1.5), "budget_bits"),
    (dict(budget_bits=3.0, reallocate_every=0), "budget_bits"),
    (dict(bit_choices=(2, 9)), "bit_choices"),
    (dict(bit_choices=()), "bit_choices"),
    (dict(reallocate_every=-1), "reallocate_every"),
    (dict(sensitivity="magic"), "sensitivity"),
    (dict(ema=1.0), "ema"),
    (dict(hysteresis=-0.1), "hysteresis"),
    (dict(freeze_after=0.0), "freeze_after"),
    (dict(soft_anneal=(10.0, 1.0)), "soft_anneal"),
])
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QATCallback\.{field}=.*allowed values"):
        QATCallback(**kwargs)

