"""`Schedule`: which optimizer step measures, re-allocates, anneals and freezes."""

from __future__ import annotations

import math

from hfqat.train.schedule import Schedule


def test_per_step_sensitivities_only_at_the_end_of_each_interval():
    schedule = Schedule(reallocate_every=8, freeze_step=20)
    assert [s for s in range(1, 30) if schedule.measures(s)] == [7, 8, 15, 16]
    schedule = Schedule(reallocate_every=1, freeze_step=3)
    assert [s for s in range(1, 6) if schedule.measures(s)] == [1, 2, 3]
    assert not any(Schedule(reallocate_every=0, freeze_step=20).measures(s) for s in range(1, 30))


def test_reallocation_steps_stop_at_the_freeze():
    schedule = Schedule.for_run(reallocate_every=5, freeze_after=0.8, max_steps=30)
    assert schedule.freeze_step == 24
    assert [s for s in range(1, 31) if schedule.reallocates(s)] == [5, 10, 15, 20]
    assert [s for s in range(1, 31) if schedule.frozen(s)] == list(range(24, 31))
    assert not any(Schedule(reallocate_every=0, freeze_step=24).reallocates(s) for s in range(1, 31))


def test_sharpness_is_geometric_until_the_freeze_then_exact():
    schedule = Schedule(reallocate_every=0, freeze_step=4, soft_anneal=(1.0, 16.0))
    assert [schedule.sharpness(s) for s in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert math.isinf(schedule.sharpness(4)) and math.isinf(schedule.sharpness(9))
    assert Schedule(reallocate_every=5, freeze_step=4).sharpness(2) is None  # annealing off
