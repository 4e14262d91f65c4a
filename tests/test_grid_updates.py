"""Optimizer updates in grid steps (`hfqat.train.grid_updates`, `QATCallback.grid_lr_power`)."""

from __future__ import annotations

import pytest
import torch
from conftest import text_dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfqat
from hfqat.quant.modeling import qat_layers
from hfqat.train.callback import QATCallback
from hfqat.train.grid_updates import GridStepUpdates

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(path, **config):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=hfqat.QATConfig(**{"bits": 4, "group_size": 32, **config}))


def _step(updates: GridStepUpdates, layers, delta: dict) -> dict:
    """One fake optimizer step adding ``delta[name]`` to each weight around before/after; returns the weight changes."""
    start = {name: layer.weight.detach().clone() for name, layer in layers}
    updates.before_step()
    with torch.no_grad():
        for name, layer in layers:
            layer.weight.add_(delta[name])
    updates.after_step()
    return {name: layer.weight.detach() - start[name] for name, layer in layers}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # (out, in) weights and Conv1D's (in, out)
def test_narrow_rows_move_by_the_factor(tiny_model_dir, arch):
    model = _model(tiny_model_dir(arch), bits_granularity="row")
    layers = list(qat_layers(model))
    name, layer = layers[0]
    out = layer.weight_row_bits.numel()
    widths = torch.tensor([4, 3, 2, 6] * (out // 4) + [4] * (out % 4), dtype=torch.int8)
    layer.set_row_bits(widths)
    delta = {n: torch.full_like(m.weight, 1e-3) for n, m in layers}
    moved = _step(GridStepUpdates(layers, power=2.0, reference_bits=4), layers, delta)

    factors = {4: 1.0, 3: 4.0, 2: 16.0, 6: 1.0}  # 2^(2·(4 − width)); wider rows than the config keep the update
    expected = torch.tensor([factors[int(b)] for b in widths]) * 1e-3
    per_row = moved[name] if layer.weight_oi() is layer.weight else moved[name].t()
    torch.testing.assert_close(per_row, expected.view(-1, 1).expand_as(per_row))
    for other, _ in layers[1:]:  # every row at the config bits: untouched
        torch.testing.assert_close(moved[other], delta[other])


def test_layer_widths_and_off(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    layers = list(qat_layers(model))
    (narrow, narrow_layer), (plain, _) = layers[0], layers[1]
    narrow_layer.set_bits(3)
    delta = {n: torch.full_like(m.weight, 1e-3) for n, m in layers}
    updates = GridStepUpdates(layers, power=1.0, reference_bits=4)
    moved = _step(updates, layers, delta)
    torch.testing.assert_close(moved[narrow], 2 * delta[narrow])
    torch.testing.assert_close(moved[plain], delta[plain])
    assert updates.row_factors(layers[1][1]) is None  # nothing copied for a layer at the config bits
    moved = _step(GridStepUpdates(layers, power=0.0, reference_bits=4), layers, delta)
    torch.testing.assert_close(moved[narrow], delta[narrow])


def test_widths_are_read_at_refresh(tiny_model_dir):
    model = _model(tiny_model_dir("llama"))
    layers = list(qat_layers(model))
    name, layer = layers[0]
    delta = {n: torch.full_like(m.weight, 1e-3) for n, m in layers}
    updates = GridStepUpdates(layers, power=1.0, reference_bits=4)
    layer.set_bits(3)
    torch.testing.assert_close(_step(updates, layers, delta)[name], delta[name])  # planned at 4 bits
    updates.refresh()
    torch.testing.assert_close(_step(updates, layers, delta)[name], 2 * delta[name])


def _one_sgd_step(path, tmp_path, power: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _model(path, layer_bits={"down_proj": 8})
    name, layer = next(iter(qat_layers(model)))
    layer.set_bits(3)
    for other, wide in qat_layers(model):
        if other.endswith("down_proj"):
            wide.set_bits(6)  # narrower than its override, wider than the config's bits (the reference): no factor
    before = {n: m.weight.detach().clone() for n, m in qat_layers(model)}
    args = TrainingArguments(str(tmp_path / f"p{power}"), max_steps=1, per_device_train_batch_size=4, optim="sgd",
                             learning_rate=0.1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0, lr_scheduler_type="constant")
    callback = QATCallback(teacher=None, budget_bits=None, reallocate_every=0, grid_lr_power=power)
    Trainer(model=model, args=args, train_dataset=text_dataset(8), callbacks=[callback]).train()
    return {n: m.weight.detach() - before[n] for n, m in qat_layers(model)}, name


def test_trainer_applies_the_factor_after_each_optimizer_step(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    plain, narrow = _one_sgd_step(path, tmp_path, 0.0)
    scaled, _ = _one_sgd_step(path, tmp_path, 2.0)
    assert plain[narrow].abs().sum() > 0
    torch.testing.assert_close(scaled[narrow], 4 * plain[narrow])  # 3 bits under a 4-bit config: 2^(2·1)
    for name in plain:
        if name != narrow:
            torch.testing.assert_close(scaled[name], plain[name])


@pytest.mark.parametrize("value", [-1.0, True, "2"])
def test_grid_lr_power_is_validated(value):
    with pytest.raises(ValueError, match="grid_lr_power"):
        QATCallback(grid_lr_power=value)
