"""`CallbackArguments`: QATCallback's settings; every bad value is a ValueError naming the field and allowed values."""

from __future__ import annotations

import json

import pytest

from hfqat.train.arguments import CallbackArguments
from hfqat.train.callback import QATCallback


@pytest.mark.parametrize("kwargs, field", [
    (dict(budget_bits="3"), "budget_bits"),
    (dict(budget_bits=8.5), "budget_bits"),  # above the largest bit choice (8)
    (dict(budget_bits=5.0, bit_choices=(2, 3, 4)), "budget_bits"),  # above the largest of these choices
    (dict(budget_bits=2.5, bit_choices=(3, 4)), "budget_bits"),  # below the smallest
    (dict(budget_bits=float("nan")), "budget_bits"),
    (dict(distill_weight="0.5"), "distill_weight"),
    (dict(temperature="2"), "temperature"),
    (dict(temperature=None), "temperature"),
    (dict(bit_choices=(2, "4")), "bit_choices"),
    (dict(bit_choices=(2.0, 4.0)), "bit_choices"),
    (dict(bit_choices=4), "bit_choices"),
    (dict(reallocate_every=5.0), "reallocate_every"),
    (dict(sensitivity=["fisher"]), "sensitivity"),
    (dict(grid_lr_power="2"), "grid_lr_power"),
    (dict(ema="0.9"), "ema"),
    (dict(hysteresis=None), "hysteresis"),
    (dict(freeze_after="0.8"), "freeze_after"),
    (dict(soft_anneal=("1", "100")), "soft_anneal"),
    (dict(soft_anneal=5.0), "soft_anneal"),
    (dict(seed=1.5), "seed"),
    (dict(write_plots="no"), "write_plots"),
])
def test_type_errors_are_value_errors_naming_the_field(kwargs, field):
    for cls in (CallbackArguments, QATCallback):
        with pytest.raises(ValueError, match=rf"QATCallback\.{field}=.*allowed values"):
            cls(**kwargs)


def test_budget_range_follows_the_bit_choices():
    assert QATCallback(budget_bits=8, bit_choices=(2, 4, 8)).budget_bits == 8
    assert QATCallback(budget_bits=3, bit_choices=(3, 4)).budget_bits == 3
    with pytest.raises(ValueError, match=r"budget_bits=4.5.*\[2, 4\]"):
        QATCallback(budget_bits=4.5, bit_choices=(4, 2))


def test_defaults_live_in_the_arguments_and_round_trip_through_json():
    callback = QATCallback()
    assert {name: getattr(callback, name) for name in ("distill_weight", "temperature", "reallocate_every")} == \
        {name: getattr(CallbackArguments(), name) for name in ("distill_weight", "temperature", "reallocate_every")}
    saved = json.loads(json.dumps(QATCallback(bit_choices=[8, 2, 4], soft_anneal=[1, 10]).saved_arguments()))
    restored = QATCallback(**saved)
    assert restored.bit_choices == (2, 4, 8) and restored.soft_anneal == (1.0, 10.0) and restored.teacher == "snapshot"
