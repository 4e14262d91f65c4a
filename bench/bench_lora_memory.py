"""LoRA + QAT vs full QAT: peak memory and step time, side by side in one run.

Each mode runs in its own fresh process (so peaks do not mix) on the same model, batch and optimizer (AdamW):

- ``full``               every parameter trains (fake-quant weights, scales, embeddings): classic QAT;
- ``lora``               `hfqat.integrations.peft.apply_lora` (adapter inside the quantizer, weight rebuilt in backward);
- ``lora-no-recompute``  the same adapters with plain autograd through ``Q(W + s·B·A)`` (what the recompute saves).

Reported per mode: trainable parameters, exact bytes of parameters / gradients / optimizer state (counted tensor
by tensor after the last backward), peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS of the process,
sampled every 2 ms during the training steps; it includes the interpreter and the model, so it is the weaker
figure) and median step time after one warm-up step.

Models: ``smollm2`` (SmolLM2-135M from the embedded GGUF, needs ``gguf``), ``llama-1b`` (random weights, Llama-3.2-1B
shapes; meant for a GPU) or ``tiny``.

Run: python bench/bench_lora_memory.py --model smollm2                         (CPU)
     python bench/bench_lora_memory.py --model llama-1b --batch 4 --seq 512   (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

MODES = ("full", "lora", "lora-no-recompute")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hfqat import QATConfig, quantize_model

    if name == "smollm2":
        from hfqat.integrations.gguf import embedded_smollm2, load_gguf_for_qat

        model, _ = load_gguf_for_qat(embedded_smollm2(), QATConfig(bits=4, group_size=64), "/tmp/smollm2_f32",
                                     dtype=dtype)
        return model.to(device)
    shapes = {
        "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                         "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
        "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 512},
    }[name]
    with device:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shapes, max_position_embeddings=4096), dtype=dtype)
    quantize_model(model, QATConfig(bits=4, group_size=128 if name != "tiny" else 64))
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Peak resident memory of this process while running (CPU has no allocator peak counter)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak, self.stop = interval_s, rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)


def run_mode(mode: str, args) -> dict:
    """One mode in this process: returns its figures as a dict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(args.model, device, dtype)
    if mode != "full":
        from peft import LoraConfig

        import hfqat.integrations.peft
        from hfqat.integrations.peft import apply_lora

        if mode == "lora-no-recompute":
            hfqat.integrations.peft._LinearRecomputedWeight.apply = staticmethod(
                lambda x, bias, build_weight, *params: F.linear(x, build_weight(), bias))
        model = apply_lora(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LLAMA_TARGETS))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    rss_before = rss_bytes()
    sampler = RssSampler()
    sampler.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, grad_bytes = [], 0
    for step in range(args.steps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        grad_bytes = tensor_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step:  # step 0 warms up (allocator, optimizer state creation)
            times.append(time.perf_counter() - start)
    sampler.stop.set()
    sampler.join()
    figures = {
        "mode": mode,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "trainable_params": sum(p.numel() for p in trainable),
        "param_mib": tensor_bytes(model.parameters()) / MIB,
        "grad_mib": grad_bytes / MIB,
        "optim_state_mib": tensor_bytes(t for s in optimizer.state.values() for t in s.values()
                                     if isinstance(t, torch.Tensor)) / MIB,
        "step_s": statistics.median(times),
        "rss_before_mib": rss_before / MIB,
        "peak_rss_mib": max(sampler.peak, rss_bytes()) / MIB,
    }
    if device.type == "cuda":
        figures["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB
    return figures


def report(results: list[dict], command: str) -> None:
    peak_key = "peak_cuda_mib" if "peak_cuda_mib" in results[0] else "peak_rss_mib"
    cols = [("mode", "{:<18}"), ("trainable_params", "{:>16,}"), ("param_mib", "{:>10.1f}"), ("grad_mib", "{:>9.1f}"),
            ("optim_state_mib", "{:>16.1f}"), (peak_key, "{:>14.1f}"), ("step_s", "{:>8.3f}")]
    print(f"device: {results[0]['device']}")
    print(" ".join(f"{name:>{len(fmt.format(results[0][name]))}}" for name, fmt in cols))
    for r in results:
        print(" ".join(fmt.format(r[name]) for name, fmt in cols))
    full = next((r for r in results if r["mode"] == "full"), None)
    if full is not None:
        state = lambda r: r["param_mib"] + r["grad_mib"] + r["optim_state_mib"]
        for r in results:
            if r is not full:
                print(f"{r['mode']} / full: peak {r[peak_key] / full[peak_key]:.1%} ({peak_key}), "
                      f"params+grads+optimizer state {state(r) / state(full):.1%}, "
                      f"step time {r['step_s'] / full['step_s']:.2f}x")
    print(f"command: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "llama-1b", "tiny"), default="smollm2")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {MODES}")
        out = subprocess.run([sys.executable, *sys.argv, "--child", mode], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(results, "python " + " ".join(sys.argv))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
