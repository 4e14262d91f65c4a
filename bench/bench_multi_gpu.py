"""QAT with QATCallback on 1 vs N GPUs through `accelerate launch` (FSDP2 or DeepSpeed): throughput, loss, bits.

Three sub-commands (a stock `transformers.Trainer`; nothing here shards anything itself):

    python bench/bench_multi_gpu.py make-model /tmp/llama1b          # random-init 1B-shaped Llama, once
    accelerate launch --config_file recipes/accelerate_fsdp2.yaml --num_processes 1 \\
        bench/bench_multi_gpu.py train --model /tmp/llama1b --out /tmp/run1 --batch 8
    accelerate launch --config_file recipes/accelerate_fsdp2.yaml --num_processes 2 \\
        bench/bench_multi_gpu.py train --model /tmp/llama1b --out /tmp/run2 --batch 4 --save-steps 20 --save-packed
    accelerate launch ... train --model /tmp/llama1b --out /tmp/run2r --batch 4 --resume /tmp/run2/checkpoint-20
    python bench/bench_multi_gpu.py report /tmp/run1 /tmp/run2 /tmp/run2r

``--replicate-teacher`` compares the snapshot teacher whole on every GPU with the default sharded one (per-layer
gathers in every teacher pass): the suspect for the per-GPU scaling gap to the plain bf16 fine-tune (``--plain``).

Same global batch on 1 and N GPUs (``--batch`` is per GPU), same data order, so the loss curves should agree.
Data: a synthetic, learnable stream (Zipf-distributed tokens whose second half repeats the first), offline.
`train` writes ``result.json`` (rank 0): per-step loss, tokens/s per GPU (mean step interval after 2 warm-up steps: re-allocation
work sits on some steps only, so the mean is the amortised rate), peak memory,
every rank's final bit allocation (gathered) and whether they are equal, and the packed export's check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hfqat
from hfqat import distributed as hd
from hfqat.export.packed import save_packed
from hfqat.train.callback import QATCallback


def make_model(path: str, vocab: int, tiny: bool) -> None:
    dims = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32}
    if tiny:  # CPU smoke runs of this script
        dims = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = LlamaConfig(vocab_size=vocab, **dims, num_key_value_heads=dims["num_attention_heads"] // 4,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)


def synthetic_blocks(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Zipf tokens (a unigram to learn), second half = first half (copying to learn)."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    half = torch.multinomial(probs, n * (seq // 2), replacement=True, generator=g).reshape(n, seq // 2)
    rows = torch.cat([half, half], dim=1)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


class StepTimer(TrainerCallback):
    """Wall time between optimizer steps (Trainer logs every step here, which synchronises the GPU)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def train(args) -> None:
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    # Loaded on the GPU so the quantizer's scale init runs there; accelerate then shards it.
    quantization = None if args.plain else hfqat.QATConfig(bits=4, group_size=args.group_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.float32,
                                                 device_map={"": local_rank} if cuda else None)
    callbacks = [] if args.plain else [
        QATCallback(budget_bits=args.budget, reallocate_every=args.reallocate_every, sensitivity=args.sensitivity,
                    replicate_teacher=args.replicate_teacher)]
    timer = StepTimer()
    training_args = TrainingArguments(
        args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, bf16=cuda, use_cpu=not cuda, logging_steps=1, report_to=[], seed=0,
        data_seed=0, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        disable_tqdm=True, dataloader_num_workers=0, full_determinism=args.deterministic)
    # The same rows (steps x global batch) whatever the GPU count, so 1- and N-GPU runs see the same batches.
    data = synthetic_blocks(args.steps * args.batch * hd.world_size(), args.seq, model.config.vocab_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=[*callbacks, timer])
    trainer.train(resume_from_checkpoint=args.resume)

    allocations = [None] * hd.world_size()
    if hd.is_distributed():
        torch.distributed.all_gather_object(allocations, hfqat.bit_allocation(trainer.model))
    else:
        allocations = [hfqat.bit_allocation(trainer.model)]
    peak = torch.tensor(torch.cuda.max_memory_allocated() if cuda else 0, dtype=torch.float64,
                        device="cuda" if cuda else "cpu")
    if hd.is_distributed():
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    packed = None
    if args.save_packed:
        save_packed(trainer.model, Path(args.out) / "packed")  # every rank; rank 0 writes
        if hd.is_main_process():
            reloaded = AutoModelForCausalLM.from_pretrained(Path(args.out) / "packed")
            spec = reloaded.config.quantization_config.packed_layers
            packed = {"bits_equal": {n: s["bits"] for n, s in spec.items()} == allocations[0],
                      "layers": len(spec)}
    if not hd.is_main_process():
        return
    intervals = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])][2:]  # skip warm-up steps
    step_time = statistics.mean(intervals)
    result = {
        "world_size": hd.world_size(), "per_gpu_batch": args.batch, "seq": args.seq,
        "tokens_per_s_per_gpu": args.batch * args.seq / step_time, "median_step_s": statistics.median(intervals),
        "mean_step_s": statistics.mean(intervals), "peak_gib_max_rank": peak.item() / 2**30,
        "losses": {int(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e},
        "allocations_equal": all(a == allocations[0] for a in allocations),
        "average_bits": hfqat.average_bits(trainer.model) if callbacks else None, "allocation": allocations[0],
        "allocation_history": [{"step": h["step"], "bits": h["bits"]} for h in callbacks[0].history] if callbacks else [],
        "distinct_bits": sorted(set(allocations[0].values())),
        "packed": packed, "resumed_from": args.resume, "command": " ".join(sys.argv),
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))


def report(runs: list[str]) -> None:
    results = [json.loads((Path(r) / "result.json").read_text()) for r in runs]
    base = results[0]
    print("| run | GPUs | tokens/s per GPU | vs 1 GPU | total tokens/s | peak GiB/GPU | allocations equal | "
          "avg bits | final loss | final bits as first run |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for run, r in zip(runs, results):
        last = max(r["losses"], key=int)
        print(f"| {run} | {r['world_size']} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x | "
              f"{r['tokens_per_s_per_gpu'] * r['world_size']:,.0f} | {r['peak_gib_max_rank']:.1f} | "
              f"{r['allocations_equal']} | {r['average_bits'] or float('nan'):.3f} | {r['losses'][last]:.4f} | "
              f"{r.get('allocation') == base.get('allocation')} |")
    for run, r in zip(runs[1:], results[1:]):
        if r.get("allocation_history"):  # which re-allocations chose the same map as the first run's
            first = {h["step"]: h["bits"] for h in base.get("allocation_history", [])}
            same = [f"{h['step']}:{h['bits'] == first.get(h['step'])}" for h in r["allocation_history"]]
            print(f"\n{run}: allocation at each re-allocation step equals {runs[0]}'s: {' '.join(same)}")
    for run, r in zip(runs, results):
        if r.get("packed"):
            print(f"\n{run}: save_packed gathered on rank 0 → {r['packed']['layers']} packed layers, reloaded bits "
                  f"{'equal' if r['packed']['bits_equal'] else 'DIFFERENT'} to the trained allocation")
    steps = sorted(set.intersection(*(set(r["losses"]) for r in results)), key=int)
    print("\nloss per step: " + " | ".join(runs))
    shown = steps[:: max(1, len(steps) // 10)]
    for s in shown + [s for s in steps[-1:] if s not in shown]:
        print(f"  {s}: " + "  ".join(f"{r['losses'][s]:.4f}" for r in results))
    for run, r in zip(runs[1:], results[1:]):
        common = [s for s in steps if s in r["losses"]]
        diff = max(abs(r["losses"][s] - base["losses"][s]) for s in common)
        print(f"max |loss - {runs[0]}| over {len(common)} common steps, {run}: {diff:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model")
    mk.add_argument("path")
    mk.add_argument("--vocab", type=int, default=32000)
    mk.add_argument("--tiny", action="store_true")
    tr = sub.add_parser("train")
    tr.add_argument("--model", required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument("--batch", type=int, default=4, help="per GPU")
    tr.add_argument("--seq", type=int, default=1024)
    tr.add_argument("--steps", type=int, default=40)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--budget", type=float, default=3.5)
    tr.add_argument("--group-size", type=int, default=128)
    tr.add_argument("--reallocate-every", type=int, default=10)
    tr.add_argument("--save-steps", type=int, default=0)
    tr.add_argument("--save-packed", action="store_true")
    tr.add_argument("--resume", default=None)
    tr.add_argument("--plain", action="store_true", help="bf16 fine-tune without hfqat (the scaling reference)")
    tr.add_argument("--deterministic", action="store_true",
                    help="Trainer's full_determinism (deterministic CUDA kernels): separates resume bugs from GPU noise")
    tr.add_argument("--replicate-teacher", action="store_true",
                    help="a whole snapshot teacher per GPU instead of one sharded like the weights (FSDP2)")
    tr.add_argument("--sensitivity", default="fisher", help="'variance' under DeepSpeed ZeRO-3 (no gradients seen)")
    rp = sub.add_parser("report")
    rp.add_argument("runs", nargs="+")
    args = parser.parse_args()
    if args.cmd == "make-model":
        make_model(args.path, args.vocab, args.tiny)
    elif args.cmd == "train":
        train(args)
    else:
        report(args.runs)


if __name__ == "__main__":
    main()
