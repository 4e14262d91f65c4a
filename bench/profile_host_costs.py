"""Host time vs wall time of the pieces of a QAT step on a small model (issue 26): where the host work goes.

A random SmolLM2-135M-shaped Llama (30 layers, 210 linear layers) in float32, hfqat W4 g64 symmetric. Each line
times one piece ten times and prints the median *host* time (until the call returns, the device idle before it) and
*wall* time (until the device is done): a piece whose host time exceeds its wall time's device share is what a
host-bound step waits on. Pieces, side by side: plain vs hfqat forward and forward + backward; every layer's
fake-quant weight by its own pass vs the bucketed pass (`hfqat.quant.batched_fake_quant`); the distillation teacher's
forward eager vs replayed as a CUDA graph (`hfqat.train.teacher_graph`), with the largest logit difference.

GPU: python bench/profile_host_costs.py            (results: bench/results/h200_s15_qat_step.md)
CPU smoke (a tiny model, no graphs): python bench/profile_host_costs.py --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hfqat
from hfqat.quant import batched_fake_quant
from hfqat.quant.modeling import qat_layers, quantize_model
from hfqat.train.distillation import SnapshotTeacher

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
TINY = dict(SMOLLM2, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)


def timed(device: torch.device, fn: Callable[[], object], repeats: int = 10) -> tuple[float, float]:
    """Median (host ms, wall ms) of ``fn``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    host, wall = [], []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        sync()
        wall.append(time.perf_counter() - start)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape, batch, seq = (SMOLLM2, 8, 512) if device.type == "cuda" else (TINY, 2, 64)
    batched_fake_quant.DEVICES = (device.type,)  # the bucketed pass where this run measures it
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(**shape)).to(device)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(device)
    quantize_model(model, hfqat.QATConfig(bits=4, group_size=64, symmetric=True))
    layers = [layer for _, layer in qat_layers(model)]
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    print(f"{len(layers)} fake-quant layers, {batch} x {seq} tokens, {device}; host / wall ms (median of 10)")

    def line(label: str, fn: Callable[[], object]) -> None:
        print(f"  {label:<58} %8.2f / %8.2f" % timed(device, fn), flush=True)

    def forward(m):
        return lambda: m(input_ids=ids, labels=ids).loss

    def forward_backward(m):
        return lambda: m(input_ids=ids, labels=ids).loss.backward()

    for label, m in (("plain", plain), ("hfqat (bucketed fake quant)", model)):
        line(f"{label}: forward", forward(m))
        line(f"{label}: forward + backward", forward_backward(m))
    devices, batched_fake_quant.DEVICES = batched_fake_quant.DEVICES, ()
    line("hfqat (every layer its own pass): forward + backward", forward_backward(model))
    line("fake-quant weights, every layer its own pass (forward)",
         lambda: [layer.quantized_weight() for layer in layers])
    batched_fake_quant.DEVICES = devices
    hook = model.__dict__["_hfqat_batched_weights"]

    def bucketed():  # what a forward does: the pre-hook, each layer taking its slice, the post-hook
        hook.before(model, ())
        weights = [layer._take_batched_weight() for layer in layers]
        hook.after(model, (), None)
        return weights

    line("fake-quant weights, bucketed (forward)", bucketed)
    model.zero_grad(set_to_none=True)

    eager, graphed = SnapshotTeacher(model), SnapshotTeacher(model, cuda_graph=True)
    kwargs = {"input_ids": ids, "use_cache": False}
    line("teacher forward, eager", lambda: eager.logits((), kwargs))
    if graphed.graphs is None:
        print("  teacher forward, CUDA graph: not on this device")
        return
    for _ in range(2):  # the second sighting of the shape captures
        graphed.logits((), kwargs)
    line("teacher forward, CUDA graph replay", lambda: graphed.logits((), kwargs))
    diff = (graphed.logits((), kwargs) - eager.logits((), kwargs)).abs().max()
    print(f"  graph vs eager logits: max |diff| {float(diff):.2e}; "
          f"memory allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
