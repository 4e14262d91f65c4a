"""How much the granularity of a mixed-precision allocation matters, before any training (CPU is fine):

    python bench/ablate_allocation_granularity.py --eval-blocks 32

SmolLM2 (the embedded GGUF, dequantized), weights quantized round-to-nearest with per-group MSE-fitted symmetric
scales (the callback's initialisation) at the widths ``--bits`` (default 3,4). Every candidate unit's cost of a
width is its Fisher-weighted quantization noise, sum of ``grad² · (Q_b(w) - w)²``, with squared gradients of the
full-precision model on ``--calib-blocks`` blocks of the training text (never the evaluation text). Units get
their widths from `hfqat.train.allocation.allocate_unit_bits` (the Lagrangian allocator, parameter-weighted average
≤ ``--budget``), at four granularities:

- ``layer``: one width per linear layer (what QATCallback allocates today);
- ``row``: per output channel;
- ``input-block``: per block of ``group_size`` input channels (all rows);
- ``group``: per quantization group (one row × ``group_size`` inputs: the unit that already has its own scale).

Prints the evaluation-text perplexity of each allocation and of the uniform widths around the budget, ratios to
uniform ``ceil(--budget)`` bits.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import bench_qat_quality as quality
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfqat.cli.data import pack_tokens, stdlib_eval_text, stdlib_train_text
from hfqat.quant.primitives import dequantize, init_scales, quantize
from hfqat.train.allocation import allocate_unit_bits

# unit of allocation → (out, in) tensor summed into that unit's values, (units,)
GRANULARITIES = {
    "layer": lambda x, g: x.sum().reshape(1),
    "row": lambda x, g: x.sum(1),
    "input-block": lambda x, g: x.reshape(x.shape[0], -1, g).sum((0, 2)),
    "group": lambda x, g: x.reshape(-1, g).sum(1),
}


def expand(granularity: str, chosen: torch.Tensor, shape: torch.Size, g: int) -> torch.Tensor:
    """(units,) per-unit values → (out, in)."""
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


def candidates(weights: dict[str, torch.Tensor], squares: dict[str, torch.Tensor], widths: tuple[int, ...],
               g: int) -> tuple[dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Per layer: ``{bits: rtn(w, bits)}`` at every width, and the (widths, out, in) element-wise Fisher-weighted
    noise of each width (``squares`` are the squared gradients)."""
    fitted = {n: {b: rtn(w, b, g) for b in widths} for n, w in weights.items()}
    costs = {n: torch.stack([squares[n] * (fitted[n][b][1] - w).pow(2) for b in widths]) for n, w in weights.items()}
    return fitted, costs


def allocate(costs: dict[str, torch.Tensor], granularity: str, g: int, widths: tuple[int, ...],
             budget: float) -> dict[str, torch.Tensor]:
    """Per layer, the (units,) bits of its units (`hfqat.train.allocation.allocate_unit_bits` over all units)."""
    reduce = GRANULARITIES[granularity]
    saved = [torch.stack([reduce(c, g) for c in per_width], 1) for per_width in costs.values()]
    sizes = [reduce(torch.ones_like(c[0]), g) for c in costs.values()]
    bits = allocate_unit_bits(torch.cat(saved), torch.cat(sizes), widths, budget)
    return dict(zip(costs, bits.split([len(s) for s in sizes])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    quality.add_run_arguments(p)
    p.add_argument("--bits", default="3,4", help="the widths a unit may take, comma-separated")
    p.add_argument("--budget", type=float, default=3.5, help="parameter-weighted average bits")
    p.add_argument("--calib-blocks", type=int, default=16, help="training-text blocks for the squared gradients")
    p.add_argument("--granularities", default=",".join(GRANULARITIES), help=f"from {list(GRANULARITIES)}")
    args = p.parse_args(argv)
    widths = tuple(sorted({int(b) for b in args.bits.split(",")}))
    if not widths[0] < args.budget < widths[-1]:
        p.error(f"--budget={args.budget} must lie between the smallest and largest of --bits={args.bits}")
    units = args.granularities.split(",")
    if set(units) - set(GRANULARITIES):
        p.error(f"--granularities={args.granularities}: allowed values are {list(GRANULARITIES)}")
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
    fitted, costs = candidates(original, squares, widths, g)
    print(f"squared gradients on {len(calib)} x {args.seq_len} tokens and RTN at {widths} bits: "
          f"{time.time() - start:.0f} s", flush=True)

    def evaluate(bits: dict[str, torch.Tensor]) -> tuple[float, float]:
        for name, layer in layers.items():
            layer.weight.data = sum(torch.where(bits[name] == b, fitted[name][b][1], 0.0) for b in widths)
        numel = sum(w.numel() for w in original.values())
        return quality.perplexity(model, eval_blocks, 4), sum(bits[n].sum().item() for n in original) / numel

    reference_bits = math.ceil(args.budget)
    results = {f"uniform {b}": evaluate({n: torch.full_like(w, b, dtype=torch.int64) for n, w in original.items()})
               for b in (reference_bits, math.floor(args.budget))}
    for granularity in units:
        chosen = allocate(costs, granularity, g, widths, args.budget)
        name = f"avg {args.budget} per {granularity}, widths {','.join(map(str, widths))}"
        results[name] = evaluate({n: expand(granularity, chosen[n], w.shape, g) for n, w in original.items()})
        print(f"{name}: {results[name][0]:.3f}", flush=True)

    reference = results[f"uniform {reference_bits}"][0]
    print(f"\nSmolLM2-135M, RTN (MSE-fitted scales), sym g{g}; eval {len(eval_blocks)} x {args.seq_len} tokens\n")
    print(f"| allocation | avg bits | eval ppl | ppl / uniform {reference_bits} |\n|---|---|---|---|")
    for name, (ppl, average) in results.items():
        print(f"| {name} | {average:.3f} | {ppl:.3f} | {ppl / reference:.3f} |")
    given = sys.argv[1:] if argv is None else argv
    print(f"\nReproduce: python bench/ablate_allocation_granularity.py {shlex.join(given)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
