"""How much the granularity of a mixed-precision allocation matters, before any training (CPU is fine):

    python bench/ablate_allocation_granularity.py --eval-blocks 32

SmolLM2 (the embedded GGUF, dequantized), weights quantized round-to-nearest with per-group MSE-fitted symmetric
scales (the callback's initialisation) at two widths (``--bits 3,4``). Every candidate unit's cost of the lower
width is its Fisher-weighted quantization noise, sum of ``grad² · (Q_low(w) - w)² - grad² · (Q_high(w) - w)²``,
with squared gradients of the full-precision model on ``--calib-blocks`` blocks of the training text (never the
evaluation text). Units are then given the higher width in order of cost saved per parameter until the
parameter-weighted average reaches ``--budget`` (two widths: that order is the knapsack's LP optimum), at four
granularities:

- ``layer``: one width per linear layer (what QATCallback allocates today);
- ``row``: per output channel;
- ``input-block``: per block of ``group_size`` input channels (all rows);
- ``group``: per quantization group (one row × ``group_size`` inputs: the unit that already has its own scale).

Prints the evaluation-text perplexity of each allocation and of the uniform widths, ratios to the higher width.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import bench_qat_quality as quality
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfqat.data import pack_tokens, stdlib_eval_text, stdlib_train_text
from hfqat.primitives import dequantize, init_scales, quantize

# unit of allocation → (out, in) tensor summed into that unit's values, (units,)
GRANULARITIES = {
    "layer": lambda x, g: x.sum().reshape(1),
    "row": lambda x, g: x.sum(1),
    "input-block": lambda x, g: x.reshape(x.shape[0], -1, g).sum((0, 2)),
    "group": lambda x, g: x.reshape(-1, g).sum(1),
}


def expand(granularity: str, chosen: torch.Tensor, shape: torch.Size, g: int) -> torch.Tensor:
    """(units,) bool → (out, in) bool mask."""
    if granularity == "layer":
        return chosen.expand(shape)
    if granularity == "row":
        return chosen.unsqueeze(1).expand(shape)
    if granularity == "input-block":
        return chosen.repeat_interleave(g).unsqueeze(0).expand(shape)
    return chosen.repeat_interleave(g).reshape(shape)


def fisher(model, blocks: list[list[int]], layers: dict) -> dict[str, torch.Tensor]:
    squares = {name: torch.zeros_like(layer.weight) for name, layer in layers.items()}
    for i in range(0, len(blocks), 4):
        ids = torch.tensor(blocks[i:i + 4], device=model.device)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for name, layer in layers.items():
            squares[name] += layer.weight.grad.float().pow(2)
    model.zero_grad()
    return squares


def rtn(w: torch.Tensor, bits: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-group MSE-fitted symmetric scales, the weight rounded to nearest on their grid)."""
    scale, _ = init_scales(w, bits, g, symmetric=True, method="mse")
    return scale, dequantize(quantize(w, scale, None, bits, g), scale, None, g)


def candidates(weights: dict[str, torch.Tensor], squares: dict[str, torch.Tensor], low: int, high: int,
               g: int) -> tuple[dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Per layer: ``{bits: rtn(w, bits)}`` at both widths, and the element-wise Fisher-weighted noise the lower
    width adds (``squares`` are the squared gradients)."""
    fitted = {n: {b: rtn(w, b, g) for b in (low, high)} for n, w in weights.items()}
    costs = {n: squares[n] * ((fitted[n][low][1] - w).pow(2) - (fitted[n][high][1] - w).pow(2))
             for n, w in weights.items()}
    return fitted, costs


def allocate(costs: dict[str, torch.Tensor], granularity: str, g: int, share_high: float) -> dict[str, torch.Tensor]:
    """Per layer, the (units,) mask of units at the higher width: by cost saved per parameter, until
    ``share_high`` of all parameters are at the higher width."""
    reduce = GRANULARITIES[granularity]
    saved = [reduce(c, g) for c in costs.values()]
    sizes = [reduce(torch.ones_like(c), g) for c in costs.values()]
    flat_saved, flat_size = torch.cat(saved), torch.cat(sizes)
    order = torch.argsort(flat_saved / flat_size, descending=True)
    high = torch.zeros_like(flat_saved, dtype=torch.bool)
    high[order[torch.cumsum(flat_size[order], 0) <= share_high * flat_size.sum()]] = True
    return dict(zip(costs, high.split([len(s) for s in saved])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    quality.add_run_arguments(p)
    p.add_argument("--bits", default="3,4", help="the two widths, low,high")
    p.add_argument("--budget", type=float, default=3.5, help="parameter-weighted average bits")
    p.add_argument("--calib-blocks", type=int, default=16, help="training-text blocks for the squared gradients")
    args = p.parse_args(argv)
    low, high = (int(b) for b in args.bits.split(","))
    if not low < args.budget < high:
        p.error(f"--budget={args.budget} must lie between the two widths {low} and {high}")
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    path, g = quality.float_checkpoint(args), args.group_size
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    eval_blocks = torch.tensor(pack_tokens(tokenizer, stdlib_eval_text(), args.seq_len, args.eval_blocks))

    start = time.time()
    calib = pack_tokens(tokenizer, stdlib_train_text(args.train_text), args.seq_len, args.calib_blocks)
    squares = fisher(model, calib, layers)
    fitted, costs = candidates(original, squares, low, high, g)
    print(f"squared gradients on {len(calib)} x {args.seq_len} tokens and RTN at {low}/{high} bits: "
          f"{time.time() - start:.0f} s", flush=True)

    def evaluate(masks: dict[str, torch.Tensor]) -> tuple[float, float]:
        for name, layer in layers.items():
            layer.weight.data = torch.where(masks[name], fitted[name][high][1], fitted[name][low][1])
        numel = sum(w.numel() for w in original.values())
        average = sum(low * w.numel() + (high - low) * masks[n].sum().item() for n, w in original.items()) / numel
        return quality.perplexity(model, eval_blocks, 4), average

    results = {f"uniform {high}": evaluate({n: torch.ones_like(w, dtype=torch.bool) for n, w in original.items()}),
               f"uniform {low}": evaluate({n: torch.zeros_like(w, dtype=torch.bool) for n, w in original.items()})}
    share_high = (args.budget - low) / (high - low)
    for granularity in GRANULARITIES:
        chosen = allocate(costs, granularity, g, share_high)
        results[f"avg {args.budget} per {granularity}"] = evaluate(
            {n: expand(granularity, chosen[n], w.shape, g) for n, w in original.items()})
        print(f"{granularity}: {results[f'avg {args.budget} per {granularity}'][0]:.3f}", flush=True)

    reference = results[f"uniform {high}"][0]
    print(f"\nSmolLM2-135M, RTN (MSE-fitted scales), sym g{g}; eval {len(eval_blocks)} x {args.seq_len} tokens\n")
    print("| allocation | avg bits | eval ppl | ppl / uniform high |\n|---|---|---|---|")
    for name, (ppl, average) in results.items():
        print(f"| {name} | {average:.3f} | {ppl:.3f} | {ppl / reference:.3f} |")
    given = sys.argv[1:] if argv is None else argv
    print(f"\nReproduce: python bench/ablate_allocation_granularity.py {shlex.join(given)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
