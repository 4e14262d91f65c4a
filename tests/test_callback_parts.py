"""QATCallback's parts without a Trainer: a sensitivity tracker and an allocator driven by a plain training loop,
the Fisher window (g² folded per step, weighed once), and the allocation history's files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfqat
from hfqat.quant.modeling import bit_allocation, qat_layers
from hfqat.train.allocator import LayerAllocator
from hfqat.train.history import HISTORY_FILE, AllocationHistory
from hfqat.train.sensitivity import SensitivityContext, make_estimator, quantization_errors
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
