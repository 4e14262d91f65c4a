"""QATCallback's parts without a Trainer: a sensitivity tracker and an allocator driven by a plain training loop,
the run's `Reallocation` driving both step by step, the Fisher window (g² folded per step, weighed once), the
allocation history's files, the grid updates and the distillation hook of a run."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import text_dataset
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.quant.modeling import bit_allocation, qat_layers
from hfqat.train.allocator import LayerAllocator
from hfqat.train.arguments import CallbackArguments
from hfqat.train.calibration import layer_kind
from hfqat.train.distillation import SnapshotTeacher
from hfqat.train.grid_updates import GridStepUpdates
from hfqat.train.history import HISTORY_FILE, AllocationHistory
from hfqat.train.reallocation import Reallocation
from hfqat.train.schedule import Schedule
from hfqat.train.candidates import quantization_errors
from hfqat.train.sensitivity import SensitivityContext, make_estimator
from hfqat.train.state_store import CheckpointStore
from hfqat.train.teachers import attach_distillation, logged_losses
from hfqat.train.tracker import SensitivityTracker

pytestmark = pytest.mark.usefixtures("one_thread")
CHOICES = (2, 3, 4, 8)


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"),
                                                quantization_config=hfqat.QATConfig(bits=4, group_size=32)).train()


def _backward(model, seed):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()


def test_fisher_window_equals_the_per_step_ema_of_weighted_errors(model):
    layers = list(qat_layers(model))
    estimator = make_estimator("fisher", CHOICES, ema=0.7)
    estimator.refit_clip(layers)
    name, layer = layers[3]
    errors = quantization_errors(layer, CHOICES, estimator.clip[name])  # the weights do not move here
    expected = None
    for step in range(3):
        _backward(model, step)
        assert estimator.update(layers, SensitivityContext(model, step))
        value = 0.5 * (errors * layer.weight.grad.pow(2)).sum((1, 2), dtype=torch.float64)
        expected = value if expected is None else 0.7 * expected + 0.3 * value
    assert list(estimator.scores[name].values()) == pytest.approx(expected.tolist(), rel=1e-5)
    _backward(model, 9)  # a later window (after a read) continues the same EMA
    estimator.update(layers, SensitivityContext(model, 9))
    expected = 0.7 * expected + 0.3 * 0.5 * (errors * layer.weight.grad.pow(2)).sum((1, 2), dtype=torch.float64)
    assert list(estimator.scores[name].values()) == pytest.approx(expected.tolist(), rel=1e-5)


def test_tracker_and_allocator_in_a_plain_loop(model):
    layers = list(qat_layers(model))
    numels = {name: layer.weight.numel() for name, layer in layers}
    tracker = SensitivityTracker("fisher", CHOICES, 0.9, layers)
    tracker.refit_clip()
    assert tracker.shared_scores() is None  # nothing observed yet: keep the allocation
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        _backward(model, step)
        tracker.observe_step(model, step, None)
        optimizer.step()
    allocator = LayerAllocator(model, layers, numels, CHOICES, budget=3.0, hysteresis=0.0)
    bits, predicted = allocator.reallocate(tracker.shared_scores(), None)
    assert bits == bit_allocation(model) and len(set(bits.values())) > 1
    assert hfqat.average_bits(model) <= 3.0 and predicted > 0
    scores = tracker.shared_scores()
    assert predicted == pytest.approx(sum(scores[n][b] for n, b in bits.items()))


def test_history_records_and_writes_json(tmp_path):
    history = AllocationHistory()
    history.record(0, {"a": 2, "b": 4}, {"a": 100, "b": 300}, None, {"m.*.a": {2: 0.5}})
    assert history.entries[0]["average_bits"] == 3.5
    assert history.entries[0]["measured_kind_loss_increase"] == {"m.*.a": {"2": 0.5}}  # JSON keys
    history.write(tmp_path, {"budget_bits": 3.5}, plots=False)
    saved = json.loads((tmp_path / HISTORY_FILE).read_text())
    assert saved["budget_bits"] == 3.5 and saved["history"] == history.entries
    assert not (tmp_path / "bit_allocation.png").exists()


def test_reallocation_in_a_plain_loop(model):
    """First allocation over budget, observation only in each interval's last quarter, a calibrated re-allocation on
    the training set's first examples every 4 steps, each recorded; a resumed `start` restores instead."""
    settings = CallbackArguments(teacher=None, budget_bits=3.0, bit_choices=CHOICES, reallocate_every=4)
    loader = torch.utils.data.DataLoader(text_dataset(32), batch_size=4, collate_fn=torch.utils.data.default_collate)
    run = Reallocation(model, settings, Schedule.for_run(4, 1.0, 8), dataloader=loader)
    assert torch.equal(run.calibration_batch(None)["input_ids"], torch.stack([e["input_ids"] for e in loader.dataset]))
    run.start(0)
    assert [entry["step"] for entry in run.history.entries] == [0] and hfqat.average_bits(model) <= 3.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    observed, observe = [], run.tracker.observe_step
    run.tracker.observe_step = lambda model, done, batch: (observed.append(done), observe(model, done, batch))
    reallocated = []
    for done, batch in zip(range(8), loader):
        run.before_step(done)
        model.zero_grad()
        model(**batch).loss.backward()
        run.before_optimizer_step(done, batch)
        optimizer.step()
        reallocated.append(run.after_step(done + 1, batch))
    assert observed == [3, 7]  # the steps 4 and 8: the last quarter of each 4-step interval
    assert reallocated == [False, False, False, True] * 2
    steps = [entry["step"] for entry in run.history.entries]
    assert steps == [0, 4, 8]
    kinds = {layer_kind(name) for name, _ in qat_layers(model)}
    assert all(set(entry["measured_kind_loss_increase"]) == kinds for entry in run.history.entries[1:])
    assert run.history.entries[-1]["bits"] == bit_allocation(model) and hfqat.average_bits(model) <= 3.0
    summary = run.summary()
    assert summary["budget_bits"] == 3.0 and summary["scores"].keys() == dict(qat_layers(model)).keys()

    saved = {"history": list(run.history.entries), "estimator": run.tracker.state_dict()}
    resumed = Reallocation(model, settings, Schedule.for_run(4, 1.0, 8), dataloader=loader)
    bits = bit_allocation(model)
    resumed.start(8, saved, CheckpointStore("QATCallback"))
    assert resumed.history.entries == saved["history"] and bit_allocation(model) == bits
    restored, scores = resumed.tracker.estimator.scores, run.tracker.estimator.scores
    assert restored.keys() == scores.keys()
    assert all(list(restored[n].values()) == pytest.approx(list(scores[n].values())) for n in scores)


def test_reallocation_off_keeps_the_bits_and_only_tracks(model):
    bits = bit_allocation(model)
    run = Reallocation(model, CallbackArguments(reallocate_every=0), Schedule.for_run(0, 0.8, 10))
    run.start(0)
    assert run.allocator is None and run.budget is None and run.history.entries == []
    assert not run.after_step(1, None) and bit_allocation(model) == bits


def test_reallocation_refuses_models_without_quantized_layers(tiny_model_dir):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="no hfqat fake-quantized layers"):
        Reallocation(plain, CallbackArguments(), Schedule.for_run(50, 0.8, 100))


def test_grid_updates_for_a_run(model, caplog):
    layers = list(qat_layers(model))
    assert GridStepUpdates.for_run(layers, 0.0, 4) is None
    with caplog.at_level(logging.WARNING):
        assert GridStepUpdates.for_run(layers, 2.0, 4, deepspeed=True) is None
    assert "no effect under DeepSpeed" in caplog.text
    updates = GridStepUpdates.for_run(layers, 2.0, 4)
    assert updates.power == 2.0 and updates.reference_bits == 4


def test_attach_distillation_builds_the_teacher_and_hooks_the_forward(model):
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    hook = attach_distillation(CallbackArguments(), model, CheckpointStore("QATCallback"))
    assert isinstance(hook.teacher, SnapshotTeacher)
    mixed = model(input_ids=ids, labels=ids).loss
    sums = hook.pop_sums()
    assert hook.last_batch["input_ids"] is ids and sums["distill_loss"] > 0
    assert float(mixed) == pytest.approx(0.5 * sums["task_loss"] + 0.5 * sums["distill_loss"], rel=1e-5)
    model(input_ids=ids, labels=ids)
    model(input_ids=ids, labels=ids)
    logged = logged_losses(hook, steps=2)  # two steps' sums, per step
    assert logged == pytest.approx(sums) and hook.pop_sums() == {}
    hook.detach()
    model(input_ids=ids, labels=ids)
    assert hook.pop_sums() == {}  # detached: the model's own forward again
    plain = attach_distillation(CallbackArguments(teacher=None), model, CheckpointStore("QATCallback"))
    model(input_ids=ids, labels=ids)
    assert plain.teacher is None and set(plain.pop_sums()) == {"task_loss"}
    plain.detach()
