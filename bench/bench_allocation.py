"""Bit allocators side by side without training: which layers get which width, judged by PTQ perplexity.

Isolates the allocation decision from QAT's recovery (CPU, a few minutes): the embedded SmolLM2-135M, W sym g64
with MSE-clipped scales, loaded at 4 bits; sensitivities from a few training batches of stdlib prose; then, per
average-bits budget, the allocation of each cost model is applied (``set_bits`` re-fits the scales from the float
weights, so every row starts from the same state) and evaluated on held-out stdlib docstrings:

- ``uniform``          every layer at the budget (integer budgets only)
- ``variance``         reverse water-filling on weight variance (no data; the callback's first allocation)
- ``fisher``           Fisher-weighted quantization noise, as estimated during training
- ``fisher+calibrated`` the same, rescaled per kind of layer and width by measured loss increases
                       (`hfqat.train.calibration`, what `QATCallback(calibrate=True)` does)

Run: python bench/bench_allocation.py [--budgets 3.0 3.5 --fisher-batches 4 --eval-tokens 8192]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfqat
from hfqat.cli.data import stdlib_eval_text, stdlib_train_text
from hfqat.cli.evaluation import token_nll
from hfqat.integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint
from hfqat.quant.modeling import bit_allocation, qat_layers
from hfqat.train.allocation import allocate_bits, weighted_average_bits
from hfqat.train.calibration import calibrate, measure_kinds
from hfqat.train.sensitivity import (
    SensitivityContext,
    make_estimator,
    weight_variance_costs,
)

CHOICES = (2, 3, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5])
    parser.add_argument("--fisher-batches", type=int, default=4, help="training batches of 2 x 512 tokens")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=f"{tempfile.gettempdir()}/smollm2_f32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    path = gguf_to_float_checkpoint(embedded_smollm2(), args.cache)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=hfqat.QATConfig(bits=4, group_size=64))
    layers = list(qat_layers(model))
    numels = {name: layer.weight.numel() for name, layer in layers}
    train_ids = tokenizer(stdlib_train_text()[:400_000], return_tensors="pt").input_ids[0]
    eval_ids = tokenizer(stdlib_eval_text(), return_tensors="pt").input_ids[0][:args.eval_tokens]
    batches = [{"input_ids": train_ids[i * 1024:(i + 1) * 1024].view(2, 512)} for i in range(args.fisher_batches)]

    estimator = make_estimator("fisher", CHOICES, ema=0.0)
    estimator.ema = 1.0 - 1.0 / args.fisher_batches  # ≈ an average over the batches
    estimator.refit_clip(layers)
    for step, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        estimator.update(layers, SensitivityContext(model, step))
    model.zero_grad(set_to_none=True)
    fisher = estimator.scores
    measured = measure_kinds(model, layers, batches[-1], CHOICES, estimator.clip, bit_allocation(model))
    costs = {"variance": {name: weight_variance_costs(layer, CHOICES) for name, layer in layers},
             "fisher": fisher, "fisher+calibrated": calibrate(fisher, measured, numels)}

    def ppl_with(bits: dict[str, int]) -> float:
        for name, layer in layers:
            layer.set_bits(bits[name])
        nll, count = token_nll(model.eval(), eval_ids, window=512, stride=512)
        return math.exp(nll / count)

    base = {name: 4 for name in numels}
    rows = [("float (no quantization)", None, math.nan)]
    with torch.no_grad():
        for name, layer in layers:  # float reference: the layers' own weights, no fake quant
            layer.forward = lambda x, layer=layer: torch.nn.functional.linear(x, layer.weight, layer.bias)
        nll, count = token_nll(model.eval(), eval_ids, window=512, stride=512)
        for _, layer in layers:
            del layer.forward
    rows[0] = ("float (no quantization)", None, math.exp(nll / count))
    for budget in args.budgets:
        if budget == int(budget):
            rows.append((f"uniform {int(budget)}", budget, ppl_with({n: int(budget) for n in base})))
        for label, table in costs.items():
            bits = allocate_bits(table, numels, budget)
            rows.append((f"{label} @ {budget}", weighted_average_bits(bits, numels), ppl_with(bits)))
    if 4.0 not in args.budgets:
        rows.append(("uniform 4", 4.0, ppl_with(base)))

    print(f"SmolLM2-135M, W sym g64 (MSE-clipped scales), no training; Fisher from {args.fisher_batches} x 2 x 512 "
          f"training tokens, calibration on the last batch; perplexity on {len(eval_ids)} held-out tokens")
    print("| allocation | avg bits | PTQ perplexity |\n|---|---:|---:|")
    for label, avg, ppl in rows:
        print(f"| {label} | {'-' if avg is None else f'{avg:.3f}'} | {ppl:.2f} |")
    print(f"\n({time.time() - started:.0f} s) command: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
