"""The demo (README's first command): FP → RTN PTQ → QAT (distillation + bit re-allocation) → packed export.

On the embedded SmolLM2-135M-Instruct, with stdlib prose for training and different stdlib text for
evaluation, everything offline. Output folder: ``results.md`` / ``results.json`` (the table), ``train/`` (the
callback's plots and history), ``packed/`` (the packed checkpoint with its model card and plots).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import QATConfig
from ..export.packed import save_packed
from ..hub.card import write_model_card
from ..quant.modeling import average_bits, qat_layers
from ..train.callback import QATCallback
from .data import load_blocks, stdlib_eval_text
from .evaluation import perplexity

EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class DemoArguments:
    """Settings of `hfqat demo` (all have flags: ``hfqat demo --steps 20 --device cpu``).

    Args:
        demo_dir: output folder.
        model: embedded:smollm2, or a local float checkpoint.
        steps: QAT optimizer steps.
        device: "cpu", "cuda" or None (CUDA when available).
        bits / group_size: the uniform RTN baseline and the starting point of QAT.
        budget_bits / bit_choices: average-bits budget and widths of QAT's re-allocation.
        block_size / batch_size / learning_rate: training tokens per block, blocks per step, peak LR.
        max_eval_tokens: held-out tokens scored for perplexity.
    """

    demo_dir: str = field(default="hfqat-demo", metadata={"help": "Output folder."})
    model: str = field(default="embedded:smollm2", metadata={"help": "embedded:smollm2 or a float checkpoint."})
    steps: int = field(default=30, metadata={"help": "QAT optimizer steps."})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)."})
    bits: int = field(default=3, metadata={"help": "RTN baseline bits (and QAT start)."})
    group_size: int = field(default=64, metadata={"help": "Group size."})
    budget_bits: float = field(default=3.0, metadata={"help": "QAT average-bits budget."})
    bit_choices: list[int] = field(default_factory=lambda: [2, 3, 4], metadata={"help": "Re-allocation widths."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training block."})
    batch_size: int = field(default=4, metadata={"help": "Blocks per step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    max_eval_tokens: int = field(default=4096, metadata={"help": "Held-out tokens for perplexity."})


def _bf16_linear_bytes(model: torch.nn.Module) -> int:
    return sum(2 * layer.weight.numel() for _, layer in qat_layers(model))


def _packed_linear_bytes(model: torch.nn.Module, packed_dir: Path) -> int:
    """Bytes of the quantized layers' tensors (codes, scales, zero points) in a `save_packed` export."""
    names = {name for name, _ in qat_layers(model)}
    tensors = load_file(packed_dir / "model.safetensors")
    return sum(t.numel() * t.element_size() for key, t in tensors.items()
               if key.rsplit(".", 1)[0] in names and not key.endswith(".bias"))


def run_demo(args: DemoArguments, load_float, command: list[str] | None = None) -> dict:
    """Run the pipeline; `load_float(quantization_config)` returns (model, tokenizer) on the CPU."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.demo_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_text = stdlib_eval_text()
    rows: dict[str, dict] = {}
    started = time.time()

    def evaluate(label: str, model) -> float:
        ppl = perplexity(model.to(device).eval(), tokenizer, eval_text, window=args.block_size,
                         max_tokens=args.max_eval_tokens, desc=f"Perplexity {label}")["ppl"]
        print(f"[hfqat demo] {label}: perplexity {ppl:.2f}")
        return ppl

    print(f"[hfqat demo] 1/5 full-precision evaluation on {device}")
    fp_model, tokenizer = load_float(None)
    fp_ppl = evaluate("FP", fp_model)
    del fp_model

    print(f"[hfqat demo] 2/5 round-to-nearest PTQ at W{args.bits} g{args.group_size}")
    config = QATConfig(bits=args.bits, group_size=args.group_size, ragged_groups="shrink")
    model, _ = load_float(config)
    bf16_bytes = _bf16_linear_bytes(model)
    rows["FP"] = {"ppl": fp_ppl, "avg bits": 16.0, "linear MB": bf16_bytes / 1e6}
    rtn_dir = save_packed(model, out / "rtn-packed")
    rows["RTN PTQ"] = {"ppl": evaluate("RTN", model), "avg bits": average_bits(model),
                       "linear MB": _packed_linear_bytes(model, rtn_dir) / 1e6}

    print(f"[hfqat demo] 3/5 QAT: {args.steps} steps, distillation + re-allocation to ≤{args.budget_bits} bits")
    train_dir = out / "train"
    callback = QATCallback(budget_bits=args.budget_bits, bit_choices=tuple(args.bit_choices),
                           reallocate_every=max(1, args.steps // 4))
    training_args = TrainingArguments(
        output_dir=str(train_dir), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10),
        weight_decay=0.0, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
        use_cpu=device == "cpu", bf16=device == "cuda", seed=0, dataloader_num_workers=0)
    train_blocks = load_blocks(tokenizer, None, args.block_size, max_blocks=args.steps * args.batch_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_blocks,
                      data_collator=default_data_collator, callbacks=[callback])
    trainer.train()
    rows["QAT (KD + realloc)"] = {"ppl": evaluate("QAT", model), "avg bits": average_bits(model), "linear MB": None}

    print("[hfqat demo] 4/5 packed export")
    packed_dir = save_packed(model, out / "packed", tokenizer=tokenizer)
    rows["QAT (KD + realloc)"]["linear MB"] = _packed_linear_bytes(model, packed_dir) / 1e6

    print("[hfqat demo] 5/5 model card")
    command = command or ["hfqat", "demo"]
    metrics = {label: {"perplexity": r["ppl"], "avg bits": r["avg bits"]} for label, r in rows.items()}
    plots = [p for p in (train_dir / "bit_allocation.png", train_dir / "loss_curves.png") if p.exists()]
    write_model_card(model, packed_dir, metrics=metrics, plots=plots, training_args=[training_args, callback],
                     reproduce_command=shlex.join(command),
                     base_model=EMBEDDED_BASE_MODEL if args.model.startswith("embedded:") else None)

    table = _table(rows, bf16_bytes)
    results = {"rows": rows, "settings": asdict(args), "device": device, "seconds": time.time() - started,
               "command": shlex.join(command)}
    (out / "results.md").write_text(table + f"\n\nReproduce: `{shlex.join(command)}`\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    print(f"\n[hfqat demo] done in {results['seconds'] / 60:.1f} min → {out.resolve()}")
    return results


def _table(rows: dict[str, dict], bf16_bytes: int) -> str:
    lines = ["| model | perplexity ↓ | avg weight bits | quantized-layer weights (MB) | vs bf16 |",
             "|---|---:|---:|---:|---:|"]
    for label, r in rows.items():
        mb = r["linear MB"]
        lines.append(f"| {label} | {r['ppl']:.2f} | {r['avg bits']:.2f} | {mb:.1f} | "
                     f"{bf16_bytes / 1e6 / mb:.2f}x smaller |" if label != "FP" else
                     f"| {label} | {r['ppl']:.2f} | 16 (bf16) | {mb:.1f} | 1.00x |")
    return "\n".join(lines)
