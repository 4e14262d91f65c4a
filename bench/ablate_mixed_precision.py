"""Ablation of QATCallback's re-allocation schedule on SmolLM2: which choices move mixed-precision quality.

Same model, data, steps and evaluation as `bench_qat_quality.py` (its functions are reused), one row per variant:

    python bench/ablate_mixed_precision.py --variants W4,W3,m35,m35-last-batch,m35-static,m35-every-third,m35-34

- ``W4`` / ``W3``: uniform bits + KD (the references).
- ``m35``: average 3.5 bits among (2, 3, 4, 8), re-allocation every steps/8 (the callback as shipped).
- ``m35-last-batch``: calibration on each re-allocation's last training batch and a first allocation from the
  uncalibrated weight-variance prior (the callback before the fixed calibration batch).
- ``m35-static``: the first (calibrated) allocation only, never re-allocated.
- ``m35-every-third``: re-allocation every steps/3.
- ``m35-34``: bit choices (3, 4) only.
- ``m30``: average 3.0 bits.
- ``m35-oracle``: a bound, not a method. Each layer alone is moved 4 → 3 bits (RTN, the others at 4) and the
  log-perplexity increase is measured *on the evaluation text*; the knapsack on these measured costs gives an
  average-3.5 allocation (3/4 bits), which then trains statically with KD. No allocator that sees only training
  data can beat it by choosing better layers (as far as per-layer costs add up); also printed: its RTN
  perplexity before training and the additive prediction.
- ``m35-groups``: a probe, not a shipped method: one width (3 or 4) per quantization *group* instead of per layer,
  chosen once before training from Fisher-weighted quantization noise on the training set's first
  ``--calib-blocks`` blocks (`ablate_allocation_granularity.py`: before training it cuts the per-layer
  allocation's log-perplexity gap to uniform 4 by three quarters), then trained statically with KD. Says
  whether sub-layer mixed precision is worth building into the callback. ``m35-rows``: the same with one width
  per output row (simpler to pack: rows of one width form one matrix). ``m35-groups-wide`` / ``m35-rows-wide``:
  the same with widths 2..6; ``m35-groups-36`` / ``m35-rows-36`` with widths 3..6.
- ``m35-rows-cb``: the callback as shipped on a model with per-row widths (``QATConfig(bits_granularity="row")``):
  dynamic per-row re-allocation among (2, 3, 4, 8); ``m35-rows-cb-wide`` among 2..6, ``m35-rows-cb-34`` among 3/4;
  ``-calm``: re-allocation every steps/3 with ``hysteresis=1.0`` (rows move less); ``-once``: the first allocation
  only (from gradients on the training set's first examples), never re-allocated; ``-once-calibrated``: the same
  with the measured calibration per kind of layer (``calibrate=True``; off by default for per-row widths).
- every variant trains with ``QATCallback(grid_lr_power=2)`` (the default: updates of rows narrower than 4 bits
  multiplied by 4^(4 - width), `hfqat.train.grid_updates`; the static probes get the same per group);
  ``<variant>-p0`` / ``-p1`` / ``-p3``: with ``grid_lr_power`` 0 (off) / 1 / 3.

Prints one line per variant (perplexity, seconds, how many layers each re-allocation changed) and the reproduce line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shlex
import sys
import tempfile
import time
from unittest import mock

import ablate_allocation_granularity as granularity
import bench_qat_quality as quality
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, TrainerCallback

import hfqat
from hfqat.quant.modeling import qat_layers
from hfqat.quant.primitives import fake_quantize
from hfqat.train.allocation import allocate_bits
from hfqat.train.callback import QATCallback
from hfqat.train.grid_updates import GridStepUpdates

CHOICES = (2, 3, 4, 8)
WIDE = (2, 3, 4, 5, 6)
# probes with a static sub-layer allocation chosen before training: unit and widths
STATIC_UNITS = {"m35-groups": ("group", (3, 4)), "m35-rows": ("row", (3, 4)), "m35-groups-wide": ("group", WIDE),
                "m35-rows-wide": ("row", WIDE), "m35-groups-36": ("group", (3, 4, 5, 6)),
                "m35-rows-36": ("row", (3, 4, 5, 6))}


def variants(steps: int) -> dict[str, tuple[int, dict, bool]]:
    """name → (config bits, QATCallback kwargs, calibrate on the last batch instead of the leading one);
    ``m35-oracle``'s allocation is set before training (`oracle_allocation`)."""
    every, mixed = max(1, steps // 8), dict(bit_choices=CHOICES, budget_bits=3.5)
    calm = dict(reallocate_every=max(1, steps // 3), hysteresis=1.0)
    return {
        "W4": (4, dict(reallocate_every=0), False),
        "W3": (3, dict(reallocate_every=0), False),
        "m35": (4, dict(mixed, reallocate_every=every), False),
        "m35-last-batch": (4, dict(mixed, reallocate_every=every), True),
        "m35-static": (4, dict(mixed, reallocate_every=steps + 1), False),
        "m35-every-third": (4, dict(mixed, reallocate_every=max(1, steps // 3)), False),
        "m35-34": (4, dict(mixed, bit_choices=(3, 4), reallocate_every=every), False),
        "m30": (4, dict(mixed, budget_bits=3.0, reallocate_every=every), False),
        "m35-oracle": (4, dict(reallocate_every=0), False),
        **{name: (4, dict(reallocate_every=0), False) for name in STATIC_UNITS},  # allocated by group_allocation
        "m35-rows-cb": (4, dict(mixed, reallocate_every=every), False),
        "m35-rows-cb-wide": (4, dict(mixed, bit_choices=WIDE, reallocate_every=every), False),
        "m35-rows-cb-34": (4, dict(mixed, bit_choices=(3, 4), reallocate_every=every), False),
        "m35-rows-cb-34-calm": (4, dict(mixed, bit_choices=(3, 4), **calm), False),
        "m35-rows-cb-34-once": (4, dict(mixed, bit_choices=(3, 4), reallocate_every=steps + 1), False),
        "m35-rows-cb-34-once-calibrated": (4, dict(mixed, bit_choices=(3, 4), reallocate_every=steps + 1,
                                                   calibrate=True), False),
        "m35-rows-cb-wide-calm": (4, dict(mixed, bit_choices=WIDE, **calm), False),
    }


class GroupGridUpdates(GridStepUpdates, TrainerCallback):
    """`QATCallback.grid_lr_power` for the static probes, whose widths live per group (``layer.probe_bits``)."""

    def row_factors(self, layer):
        return torch.exp2(self.power * (self.reference_bits - layer.probe_bits).clamp_min(0))  # (out, groups)

    @staticmethod
    def _shaped(layer, param, factors):
        return factors.repeat_interleave(layer.spec.group_size, 1) if param is layer.weight else factors

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after_step()


def oracle_allocation(model, blocks: torch.Tensor, batch: int, budget: float = 3.5) -> dict[str, int]:
    """Knapsack (3/4 bits) on each layer's measured eval log-perplexity increase at 3 bits; prints the bound."""
    base = math.log(quality.perplexity(model, blocks, batch))
    costs = {}
    for name, layer in tqdm(list(qat_layers(model)), desc="oracle: one layer at 3 bits"):
        layer.set_bits(3)
        costs[name] = {3: math.log(quality.perplexity(model, blocks, batch)) - base, 4: 0.0}
        layer.set_bits(4)  # the MSE init is a function of the weight: the same scales as before
    bits = allocate_bits(costs, {name: layer.weight.numel() for name, layer in qat_layers(model)}, budget)
    for name, layer in qat_layers(model):
        layer.set_bits(bits[name])
    predicted = math.exp(base + sum(costs[n][3] for n, b in bits.items() if b == 3))
    print(f"m35-oracle: RTN W4 {math.exp(base):.3f}, RTN at the oracle allocation "
          f"{quality.perplexity(model, blocks, batch):.3f} (additive prediction {predicted:.3f})", flush=True)
    return bits


def group_allocation(model, dataset, calib_blocks: int, unit: str = "group", budget: float = 3.5,
                     widths: tuple[int, ...] = (3, 4)) -> float:
    """Give every ``unit`` (``group`` or ``row``, see `ablate_allocation_granularity.py`) of every layer one of
    ``widths`` (average ``budget``), re-fit its groups' scales for that width, and make the layer quantize each
    group at its own width; returns the average bits."""
    layers = dict(qat_layers(model))
    squares = granularity.fisher(model, [b["input_ids"].tolist() for b in dataset[:calib_blocks]], layers)
    g = layers[next(iter(layers))].spec.group_size
    weights = {name: layer.weight.detach().float() for name, layer in layers.items()}
    fitted, costs = granularity.candidates(weights, squares, widths, g)
    chosen = granularity.allocate(costs, unit, g, widths, budget)
    total = used = 0
    for name, layer in layers.items():
        per_weight = granularity.expand(unit, chosen[name], layer.weight.shape, g)
        group_bits = per_weight.reshape(*layer.weight_scale.shape, g)[..., 0]  # one width per group either way
        with torch.no_grad():
            layer.weight_scale.copy_(sum(torch.where(group_bits == b, fitted[name][b][0], 0.0) for b in widths))
        layer.probe_bits = group_bits.float()  # GroupGridUpdates: one width per group
        layer.fake_quantize_weight = functools.partial(_fake_quantize_per_group, layer.spec,
                                                       group_bits.unsqueeze(-1).to(layer.weight.device))
        total, used = total + layer.weight.numel(), used + per_weight.sum().item()
    return used / total


def _fake_quantize_per_group(spec, bits, w, scale, zero_point, sharpness=math.inf, out_dtype=torch.float32):
    # FakeQuantMixin.fake_quantize_weight with a width per group instead of the layer's one
    return fake_quantize(w, scale, zero_point, bits, spec.group_size, spec.rounding, spec.clamping, sharpness,
                         out_dtype=out_dtype)


def _split(name: str) -> tuple[str, float]:
    """(table variant, grid_lr_power) of a variant name."""
    for power in (0, 1, 3):
        if name.endswith(f"-p{power}"):
            return name.removesuffix(f"-p{power}"), float(power)
    return name, 2.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="W4,m35,m35-last-batch,m35-static,m35-every-third,m35-34,m30,W3")
    quality.add_run_arguments(p)
    p.add_argument("--calib-blocks", type=int, default=16, help="m35-groups: training blocks for its allocation")
    args = p.parse_args(argv)
    table = variants(args.steps)
    names = args.variants.split(",")
    unknown = [n for n in names if _split(n)[0] not in table]
    if unknown:
        p.error(f"--variants: unknown {unknown}; allowed: {sorted(table)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    path = quality.float_checkpoint(args)
    dataset, eval_blocks = quality.load_blocks(AutoTokenizer.from_pretrained(path), args)
    for name in names:
        base, power = _split(name)
        bits, kwargs, last_batch = table[base]
        granularity = "row" if name.startswith("m35-rows-cb") else "layer"
        model = quality.hfqat_model(path, quality.Row(name, bits, "qat", bits, bits_granularity=granularity),
                                    args.group_size, device)
        if base == "m35-oracle":
            oracle_allocation(model, eval_blocks, args.batch)
        group_bits = None
        if base in STATIC_UNITS:
            unit, widths = STATIC_UNITS[base]
            group_bits = group_allocation(model, dataset, args.calib_blocks, unit, widths=widths)
        callback = QATCallback(**kwargs, grid_lr_power=power)
        # Without a leading batch the callback falls back to the last training batch (and an uncalibrated prior).
        patch = mock.patch("hfqat.train.callback.leading_batch", return_value=None) if last_batch else contextlib.nullcontext()
        start = time.perf_counter()
        with patch:
            probes = [GroupGridUpdates(list(qat_layers(model)), power, bits)] if base in STATIC_UNITS else []
            quality.train(model, dataset, args, [callback, *probes], tempfile.mkdtemp(prefix="ablate_"))
        seconds = time.perf_counter() - start
        ppl = quality.perplexity(model, eval_blocks, args.batch)
        h = callback.history
        changes = [sum(h[i]["bits"][k] != h[i - 1]["bits"][k] for k in h[i]["bits"]) for i in range(1, len(h))]
        print(f"{name}: ppl {ppl:.3f} avg bits {group_bits or hfqat.average_bits(model):.3f} ({seconds:.0f} s) "
              f"layers changed per re-allocation {changes}", flush=True)
        model = callback = None
        quality.free()
    print("\nReproduce: python " + shlex.join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
