r"""Bit allocation for Mixture-of-Experts weights: each expert of a fused experts module is one unit.

A unit ``<experts>[e]`` is expert ``e`` of a converted experts module (`hfqat.quant.experts.QATExpertsMixin`) over all
its quantized tensors (``gate_up_proj`` and ``down_proj`` move together: an expert is deployed as one block); its
weight count ``n_e`` is what the budget counts (``Σ n·b ≤ budget · Σ n``, together with the layers if merged).

Cost, like the ``fisher`` layer estimator: ``ΔL_e(b) = ½ Σ_i g_i² (Q_b(w_i) - w_i)²`` over the expert's weights, from
the gradients the float expert weights receive through the straight-through estimator, observed after backward
(`ExpertSensitivity.observe`), averaged per observed step and smoothed like the layers' Fisher EMA (``ema^n`` per
window of ``n`` observed steps), so expert and layer costs share one scale in one allocation
(`hfqat.train.allocator`). ``Q_b`` is the current quantizer for the current width and the min-max grid for the others
(as `hfqat.train.sensitivity` does for layers).

Routing frequency. A token routed to expert ``e`` is the only source of its gradient, so the Fisher cost already
weighs experts by use: an expert that sees 1 % of the tokens contributes about 1 % of the loss change, and lower bits
there are the right call. What frequency breaks is the *estimate*: an expert that saw few or no tokens in the window has
a noisy or zero gradient, which would read as "free to quantize". So an expert with fewer than ``min_tokens`` routed
tokens in the window (counted by the module's ``routed_tokens``) gets a prior instead: its quantization error times
the module's mean curvature per weight per routed token (from the well-observed experts), times
``max(tokens_e, min_tokens)``. Rare experts thus pay in proportion to their use, never less than ``min_tokens`` worth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..quant.experts import QATExpertsMixin, expert_unit_name, qat_experts
from .allocation import allocate_unit_bits
from .candidates import _grid_weights


def unit_name(module_name: str, expert: int) -> str:
    return expert_unit_name(module_name, expert)  # the names `hfqat.bit_allocation` reports


def expert_units(model: nn.Module) -> dict[str, tuple[QATExpertsMixin, int]]:
    """{unit name: (experts module, expert index)} in module order."""
    return {unit_name(name, e): (module, e) for name, module in qat_experts(model)
            for e in range(module.num_experts_quantized)}


def expert_numels(model: nn.Module) -> dict[str, int]:
    """{unit name: weights of that expert} (the budget's weights)."""
    return {unit: module.expert_numel() for unit, (module, _) in expert_units(model).items()}


def expert_bits(model: nn.Module) -> dict[str, int]:
    """{unit name: current width} (an expert's tensors share one width when set through `apply_expert_bits`)."""
    return {unit: int(max(q.weight_bits[e] for q in module.quantizers.values()))
            for unit, (module, e) in expert_units(model).items()}


@torch.no_grad()
def apply_expert_bits(model: nn.Module, bits: Mapping[str, int]) -> None:
    """Set the listed units' widths (scales of changed experts are re-fit in place)."""
    by_module: dict[int, tuple[QATExpertsMixin, dict[int, int]]] = {}
    units = expert_units(model)
    for unit, b in bits.items():
        if unit not in units:
            raise ValueError(f"apply_expert_bits: unknown unit {unit!r}; allowed: names from expert_units(model)")
        module, e = units[unit]
        by_module.setdefault(id(module), (module, {}))[1][e] = int(b)
    for module, chosen in by_module.values():
        current = next(iter(module.quantizers.values())).weight_bits.clone()
        for e, b in chosen.items():
            current[e] = b
        module.set_expert_bits(current)


class ExpertSensitivity:
    """Per-expert Fisher costs with the routing-frequency handling of the module docstring."""

    def __init__(self, bit_choices: Iterable[int] = (2, 3, 4, 8), ema: float = 0.9, min_tokens: int = 64) -> None:
        self.bit_choices = tuple(sorted(set(bit_choices)))
        self.ema, self.min_tokens = ema, min_tokens
        self._window: dict[str, torch.Tensor] = {}  # module name -> (E, bits) costs summed since the last close
        self._tokens: dict[str, torch.Tensor] = {}  # module name -> routed_tokens at the window start (else 0)
        self._steps: dict[str, int] = {}  # module name -> observations in the window
        self.scores: dict[str, dict[int, float]] = {}  # unit -> smoothed {bits: cost}

    @torch.no_grad()
    def observe(self, model: nn.Module) -> None:
        """Add this backward's per-expert costs (call after backward, before the gradients are cleared)."""
        for name, module in qat_experts(model):
            for pname, q in module.quantizers.items():
                w = module._parameters[pname]
                if w.grad is None:
                    continue
                lay = q.layout
                rows = q.rows(w).view(lay.num_experts, lay.out_features, lay.in_features)
                g2 = q.rows(w.grad).view_as(rows).float().pow(2)
                exact = q.fake_quantize(w, exact=True)
                current = (q.rows(exact).view_as(rows).float() - rows.float()).pow(2)
                cost = torch.empty(lay.num_experts, len(self.bit_choices), device=w.device)
                for e in range(lay.num_experts):  # at allocation-statistics time, not in the forward
                    grid = _grid_weights(rows[e], self.bit_choices, (1.0,) * len(self.bit_choices),
                                         q.spec.group_size, q.spec.symmetric)
                    err = (grid - rows[e].float()).pow(2)
                    own = self.bit_choices.index(int(q.weight_bits[e])) if int(q.weight_bits[e]) in \
                        self.bit_choices else None
                    if own is not None:
                        err[own] = current[e]
                    cost[e] = 0.5 * (g2[e] * err).sum((-1, -2))
                total = self._window.get(name)
                self._window[name] = cost if total is None else total.to(cost.device) + cost
            if name in self._window:
                self._steps[name] = self._steps.get(name, 0) + 1

    @torch.no_grad()
    def close_window(self, model: nn.Module) -> dict[str, dict[int, float]]:
        """Fold the window into the EMA scores (with the routing-frequency prior) and start a new window.

        Scaled like the ``fisher`` layer estimator, so both can share one allocation: the window's mean cost per
        observed step (the layers' EMA also averages per-step costs), and an old score decays by ``ema`` per observed
        step (``ema^n`` over a window of ``n``, as the layers' EMA does)."""
        for name, module in qat_experts(model):
            if name not in self._window:
                continue
            steps = max(self._steps.pop(name, 1), 1)
            cost = self._window.pop(name) / steps
            start = self._tokens.get(name, torch.zeros_like(module.routed_tokens)).to(module.routed_tokens.device)
            self._tokens[name] = module.routed_tokens.clone()
            tokens = (module.routed_tokens - start).to(cost.device)
            observed = tokens >= self.min_tokens
            if bool(observed.any()) and not bool(observed.all()):
                # mean cost per routed token of the observed experts, relative to their plain weight error
                error = self._plain_errors(module).to(cost.device)
                per_token = (cost[observed] / error[observed].clamp_min(1e-30)).sum(0) / tokens[observed].sum()
                prior = error * per_token * tokens.clamp_min(self.min_tokens).unsqueeze(1)
                cost = torch.where(observed.unsqueeze(1), cost, prior)
            for e in range(cost.shape[0]):
                unit = unit_name(name, e)
                new = {b: float(c) for b, c in zip(self.bit_choices, cost[e].tolist(), strict=True)}
                old = self.scores.get(unit)
                decay = self.ema ** steps
                self.scores[unit] = new if old is None else {
                    b: decay * old[b] + (1 - decay) * new[b] for b in self.bit_choices}
        return dict(self.scores)

    @torch.no_grad()
    def _plain_errors(self, module: QATExpertsMixin) -> torch.Tensor:
        """(E, bits) squared min-max grid errors of each expert (no curvature)."""
        out = 0
        for pname, q in module.quantizers.items():
            lay = q.layout
            rows = q.rows(module._parameters[pname]).view(lay.num_experts, lay.out_features, lay.in_features)
            out = out + torch.stack([
                (_grid_weights(rows[e], self.bit_choices, (1.0,) * len(self.bit_choices), q.spec.group_size,
                               q.spec.symmetric) - rows[e].float()).pow(2).sum((-1, -2))
                for e in range(lay.num_experts)])
        return out

    def allocate(self, model: nn.Module, budget_bits: float) -> dict[str, int]:
        """Per-expert widths minimising the summed cost under the budget (experts only; to share one budget with the
        layers, merge ``scores`` / `expert_numels` with the layers' before calling the allocator)."""
        units = [u for u in expert_units(model) if u in self.scores]
        if not units:
            return {}
        costs = torch.tensor([[self.scores[u][b] for b in self.bit_choices] for u in units])
        numels = expert_numels(model)
        bits = allocate_unit_bits(costs, torch.tensor([numels[u] for u in units]), self.bit_choices, budget_bits)
        return dict(zip(units, bits.tolist(), strict=True))

    # -- state (JSON-friendly: a resumed run continues the same EMAs, window and routing baselines) ----------------
    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "window": {n: c.tolist() for n, c in self._window.items()},
                "steps": dict(self._steps), "tokens": {n: t.tolist() for n, t in self._tokens.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scores = {unit: {int(b): float(v) for b, v in per_bits.items()}
                       for unit, per_bits in state.get("scores", {}).items()}
        self._window = {n: torch.tensor(c, dtype=torch.float32) for n, c in state.get("window", {}).items()}
        self._steps = {n: int(k) for n, k in state.get("steps", {}).items()}
        self._tokens = {n: torch.tensor(t, dtype=torch.float32) for n, t in state.get("tokens", {}).items()}


@torch.no_grad()
def expert_variance_costs(model: nn.Module, bit_choices: Iterable[int]) -> dict[str, dict[int, float]]:
    """{unit: {bits: n σ² 2^{-2b}}}: the weight-variance prior of `hfqat.train.sensitivity.weight_variance_costs`
    (same formula, so the first allocation ranks layers and experts on one scale) over each expert's tensors."""
    choices = tuple(bit_choices)
    powers = torch.tensor([math.pow(2.0, -2 * b) for b in choices], dtype=torch.float64)
    out: dict[str, dict[int, float]] = {}
    for name, module in qat_experts(model):
        total = torch.zeros(module.num_experts_quantized, dtype=torch.float64)
        for pname, q in module.quantizers.items():
            lay, group = q.layout, q.spec.group_size if q.spec.group_size > 0 else q.layout.in_features
            rows = q.rows(module._parameters[pname]).detach().float().view(lay.num_experts, lay.out_features, -1, group)
            variance = rows.var(-1, unbiased=False).mean((-1, -2)).double().cpu()  # (E,) mean within-group variance
            total += lay.out_features * lay.in_features * variance
        for e in range(module.num_experts_quantized):
            out[unit_name(name, e)] = dict(zip(choices, (total[e] * powers).tolist()))
    return out
