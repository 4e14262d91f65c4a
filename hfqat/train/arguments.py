"""`CallbackArguments`: every setting of `QATCallback`, its default and its validation, in one place.

The defaults here are the only ones: `QATCallback`, recipes and benchmarks take them from this class, so a new
default is a one-line change. Every bad value raises a `ValueError` naming the field and the allowed values (never
a bare `TypeError` from a comparison further down).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import SUPPORTED_BITS
from .sensitivity import ESTIMATORS

# The settings a checkpoint's trainer_state.json records (JSON values; a teacher *model* cannot be saved).
SAVED_FIELDS = ("teacher_dtype", "teacher_cuda_graph", "replicate_teacher", "distill_weight", "temperature",
                "budget_bits", "reallocate_every", "sensitivity", "calibrate", "grid_lr_power", "ema", "hysteresis",
                "freeze_after", "seed", "write_plots", "tie_fused")

TEACHER_DTYPES = ("model", "bfloat16", "float16")


def _invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"QATCallback.{name}={value!r} is invalid; allowed values: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(eq=False)
class CallbackArguments:
    """The settings of `QATCallback`.

    Args:
        teacher: "snapshot" (frozen copy of the quantized layers' float weights taken at train start, sharing
            everything else with the student), a model, a path/hub id loadable by `AutoModelForCausalLM`,
            or None (no distillation).
        teacher_dtype: what the teacher computes in: "model" (the student's dtype: the teacher is exactly the
            train-start model), "bfloat16" or "float16" (the snapshot is stored in it and the teacher pass runs under
            autocast to it; a path teacher is loaded in it): for a float32 student, half the snapshot's memory and a
            fraction of the teacher's GPU time, which speeds up steps that wait on the GPU, not those that wait on the
            host (`hfqat.train.distillation`). A teacher given as a model runs as it is.
        teacher_cuda_graph: on a GPU, record the teacher's forward once as a CUDA graph and replay it on later steps
            of the same batch shape (`hfqat.train.teacher_graph`): the pass then costs no host time. Plain causal-LM
            batches only (others run eagerly). Off by default: on SmolLM2 (H200) the replayed teacher's GPU time
            no longer overlapped its own host work and the Trainer step got slower (231 vs 220 ms), though
            faster where the host was slower still (under the profiler: 277 vs 311 ms).
        replicate_teacher: under FSDP2, keep a whole copy of the snapshot teacher on every rank instead of
            sharding it like the weights (the teacher pass then gathers nothing; costs the quantized layers'
            full float weights per rank). Other engines keep it whole anyway.
        distill_weight: α in ``(1-α)·task + α·T²·KL(teacher‖student)``, in [0, 1].
        temperature: T > 0.
        budget_bits: parameter-weighted average bits the allocation must not exceed, in [min(bit_choices),
            max(bit_choices)]; None = the config's bits.
        bit_choices: bit widths a layer may take (2..8).
        reallocate_every: re-allocate every this many optimizer steps; 0 turns re-allocation off (then
            budget_bits must be None).
        sensitivity: "fisher" | "kfac" | "hutchinson" | "variance" (see `hfqat.train.sensitivity`).
        calibrate: before each re-allocation, measure the loss increase of every kind of layer at every bit
            choice on the training set's first examples (the last batch if the dataset cannot be indexed) and
            rescale the estimator's predictions to it (`hfqat.train.calibration`; ``kinds × bit choices + 1`` extra
            forward passes per re-allocation). None (default): on for per-layer widths, off for per-row widths
            (rescaling all rows of a layer by one factor trained worse on SmolLM2: bench/results).
        grid_lr_power: p in the update factor ``2^(p · (config bits − width))`` of rows narrower than the config's
            bits (`hfqat.train.grid_updates`); 0 turns it off, 1 keeps updates constant in grid steps; ≥ 0. Costs a copy
            of those layers' weights during each optimizer step; has no effect under DeepSpeed (its optimizer
            keeps its own master weights).
        ema: smoothing of the sensitivity measurements, in [0, 1).
        hysteresis: a layer only changes bits when the predicted gain of the whole new allocation exceeds
            ``hysteresis × (mean predicted loss increase per layer)`` for every layer that changes; ≥ 0.
        freeze_after: fraction of max_steps after which bits are frozen and soft rounding is exact, in (0, 1].
        soft_anneal: (start, end) sharpness of soft rounding/clamping, or None to leave it alone.
        seed: seed of the Hutchinson probes (derived per step, so resumed runs draw the same probes).
        write_plots: write the PNG figures at train end (the JSON history is always written).
        tie_fused: per-layer widths: hold the layers a serving engine fuses into one matmul (q/k/v, gate/up; Mixtral's
            w1/w3) at one width, each group one item of the exact allocation (`hfqat.train.allocation.
            allocate_tied_bits`). On by default: vLLM serves each group as one layer with one scheme, and
            `hfqat.export_compressed_tensors` refuses fused shards whose widths differ. False lets every layer take
            its own width (for engines that do not fuse, or GGUF). Per-row widths are not affected.
    """

    teacher: Any = "snapshot"
    teacher_dtype: str = "model"
    teacher_cuda_graph: bool = False
    replicate_teacher: bool = False
    distill_weight: float = 0.5
    temperature: float = 2.0
    budget_bits: float | None = None
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    reallocate_every: int = 50
    sensitivity: str = "fisher"
    calibrate: bool | None = None
    grid_lr_power: float = 2.0
    ema: float = 0.9
    hysteresis: float = 0.05
    freeze_after: float = 0.8
    soft_anneal: tuple[float, float] | None = (1.0, 100.0)
    seed: int = 0
    write_plots: bool = True
    tie_fused: bool = True

    def __post_init__(self) -> None:
        self.validate()
        self.bit_choices = tuple(sorted(self.bit_choices))
        if self.soft_anneal is not None:
            self.soft_anneal = (float(self.soft_anneal[0]), float(self.soft_anneal[1]))

    def validate(self) -> None:
        """Raise a `ValueError` naming the first invalid field and its allowed values."""
        t = self.teacher
        if not (t is None or isinstance(t, (str, os.PathLike, nn.Module))):
            raise _invalid("teacher", t, '"snapshot", a model, a path, or None')
        if not (isinstance(self.teacher_dtype, str) and self.teacher_dtype in TEACHER_DTYPES):
            raise _invalid("teacher_dtype", self.teacher_dtype, ", ".join(f'"{d}"' for d in TEACHER_DTYPES))
        for name in ("teacher_cuda_graph", "replicate_teacher", "write_plots", "tie_fused"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "True or False")
        if not (_is_number(self.distill_weight) and 0.0 <= self.distill_weight <= 1.0):
            raise _invalid("distill_weight", self.distill_weight, "a number in [0, 1]")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise _invalid("temperature", self.temperature, "a number > 0")
        choices = self.bit_choices
        if (not isinstance(choices, (tuple, list)) or not choices or not all(_is_int(b) for b in choices)
                or len(set(choices)) != len(choices) or any(b not in SUPPORTED_BITS for b in choices)):
            raise _invalid("bit_choices", choices,
                           f"a non-empty sequence of distinct integers from {list(SUPPORTED_BITS)}")
        if not (_is_int(self.reallocate_every) and self.reallocate_every >= 0):
            raise _invalid("reallocate_every", self.reallocate_every, "an integer >= 0 (0 = no re-allocation)")
        if self.budget_bits is not None:
            low, high = min(choices), max(choices)
            if not (_is_number(self.budget_bits) and low <= self.budget_bits <= high):
                raise _invalid("budget_bits", self.budget_bits,
                               f"None (the config's bits) or a number in [{low}, {high}] (the range of bit_choices)")
            if self.reallocate_every == 0:
                raise _invalid("budget_bits", self.budget_bits,
                               "None when reallocate_every=0 (re-allocation off); set reallocate_every > 0")
        if not (isinstance(self.sensitivity, str) and self.sensitivity in ESTIMATORS):
            raise _invalid("sensitivity", self.sensitivity, str(sorted(ESTIMATORS)))
        if not (self.calibrate is None or isinstance(self.calibrate, bool)):
            raise _invalid("calibrate", self.calibrate, "None (per-layer widths: on, per-row: off), True or False")
        if not (_is_number(self.grid_lr_power) and self.grid_lr_power >= 0):
            raise _invalid("grid_lr_power", self.grid_lr_power, "a number >= 0 (0 = off)")
        if not (_is_number(self.ema) and 0.0 <= self.ema < 1.0):
            raise _invalid("ema", self.ema, "a number in [0, 1)")
        if not (_is_number(self.hysteresis) and self.hysteresis >= 0):
            raise _invalid("hysteresis", self.hysteresis, "a number >= 0")
        if not (_is_number(self.freeze_after) and 0.0 < self.freeze_after <= 1.0):
            raise _invalid("freeze_after", self.freeze_after, "a number in (0, 1]")
        anneal = self.soft_anneal
        if anneal is not None and not (isinstance(anneal, (tuple, list)) and len(anneal) == 2
                                       and all(_is_number(s) for s in anneal) and 0 < anneal[0] <= anneal[1]):
            raise _invalid("soft_anneal", anneal, "None or (start, end) numbers with 0 < start <= end")
        if not _is_int(self.seed):
            raise _invalid("seed", self.seed, "an integer")

    def saved_arguments(self) -> dict[str, Any]:
        """The settings as JSON values, to re-create the callback from a checkpoint (without a teacher model)."""
        args = {name: getattr(self, name) for name in SAVED_FIELDS}
        args["bit_choices"] = list(self.bit_choices)
        args["soft_anneal"] = list(self.soft_anneal) if self.soft_anneal is not None else None
        if self.teacher is None or isinstance(self.teacher, (str, os.PathLike)):
            args["teacher"] = os.fspath(self.teacher) if self.teacher is not None else None
        return args
