"""Mixture-of-Experts QAT and packed decode vs bf16 on a Mixtral-shaped model (issue 20).

Model: Mixtral shape with random init — hidden 4096, intermediate 14336, 8 experts, top-2, 32/8 heads, vocab 32000,
``--layers`` decoder layers (default 2), bf16 weights, SDPA attention, transformers' default experts implementation.

1. QAT step: forward + backward + fused AdamW step on random tokens (``--batch`` × ``--seq``), median of CUDA-event
   timed steps after warm-up; ``bf16`` (plain fine-tune) vs ``hfqat`` (``quantize_model`` with W4 g128: every linear
   and every fused expert tensor fake-quantized per expert, routers float). Target: hfqat ≤ 1.3x bf16.
2. Decode: batch-1 greedy ``generate`` of ``--tokens`` tokens after a short prompt; ``bf16`` vs the ``save_packed``
   W4 g128 model reloaded with ``from_pretrained`` (experts stacked per width; the routed token-expert pairs run
   through the grouped low-bit GEMV, expert ids read on the device, `hfqat.export.packed_experts`), once per
   ``--modes`` entry: ``eager`` (dynamic cache) and ``static`` (``cache_implementation="static"``: transformers
   compiles the decode step with torch.compile, mode reduce-overhead = CUDA graphs, on CUDA; warm-up runs compile and
   record first). Target: packed ≥ 1.8x bf16 tokens/s. Also prints the max |logit| difference of packed vs
   fake-quant on one prompt (same numerics: small).

GPU:        PYTHONPATH=. python bench/bench_moe.py --device cuda [--layers 2 --batch 4 --seq 1024 --tokens 128]
            PYTHONPATH=. python bench/bench_moe.py --device cuda --skip qat --modes eager,static   (decode only)
CPU smoke:  PYTHONPATH=. python bench/bench_moe.py --device cpu --smoke   (tiny shapes, checks the script runs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import hfqat
from hfqat.export.packed import prepare_backends
from hfqat.export.packed_experts import packed_experts
from hfqat.quant.coverage import coverage

MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
             num_local_experts=8, num_experts_per_tok=2)


def build(args, shape: dict) -> torch.nn.Module:
    config = MixtralConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=max(args.seq, 4096),
                           tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model, args) -> dict:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            fused=args.device == "cuda")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    times = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        _sync(args.device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    del opt
    return {"step_s": statistics.median(times), "peak_gib": peak, "loss": float(loss.detach())}


DECODE_MODES = {"eager": {}, "static": {"cache_implementation": "static"}}


@torch.no_grad()
def time_decode(model, args, mode: str) -> dict:
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=args.device,
                           generator=torch.Generator(args.device).manual_seed(1))
    kwargs = dict(do_sample=False, min_new_tokens=args.tokens, max_new_tokens=args.tokens, pad_token_id=0,
                  **DECODE_MODES[mode])
    if mode == "static":  # same lengths as timed (the cache's shape): compile, then CUDA-graph recording
        for _ in range(2):
            model.generate(prompt, **kwargs)
    else:
        model.generate(prompt, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up / backend set-up
    rates = []
    for _ in range(args.rounds):
        _sync(args.device)
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        _sync(args.device)
        rates.append((out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start))
    return {"tok_s": statistics.median(rates), "tokens": out[0, prompt.shape[1]:].tolist()[:8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check that the script runs)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--skip", default="", help="comma list: qat,decode")
    parser.add_argument("--modes", default="eager,static", help=f"decode modes, comma list of {list(DECODE_MODES)}")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    shape = SMOKE if args.smoke else MIXTRAL
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup, args.tokens, args.rounds = 2, 32, 2, 1, 8, 1
        args.group_size = min(args.group_size, 64)
    args.dtype = torch.bfloat16
    qconfig = hfqat.QATConfig(bits=4, group_size=args.group_size)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    skip = set(args.skip.split(","))
    modes = args.modes.split(",")
    if not set(modes) <= set(DECODE_MODES):
        parser.error(f"--modes={args.modes!r}: allowed values are comma lists of {list(DECODE_MODES)}")

    if "qat" not in skip:
        model = build(args, shape)
        results["experts_implementation"] = model.config._experts_implementation
        results["qat_bf16"] = time_steps(model, args)
        del model
        model = build(args, shape)
        hfqat.quantize_model(model, qconfig)
        results["coverage"] = round(coverage(model)["quantized_fraction"], 4)
        results["qat_hfqat"] = time_steps(model, args)
        results["qat_ratio"] = results["qat_hfqat"]["step_s"] / results["qat_bf16"]["step_s"]
        print(f"QAT step: bf16 {results['qat_bf16']['step_s'] * 1e3:.1f} ms, hfqat W4 "
              f"{results['qat_hfqat']['step_s'] * 1e3:.1f} ms -> x{results['qat_ratio']:.2f} (target <= 1.3); "
              f"peak {results['qat_bf16']['peak_gib']:.1f} / {results['qat_hfqat']['peak_gib']:.1f} GiB; "
              f"quantized fraction {results['coverage']}", flush=True)
        del model

    if "decode" not in skip:
        model = build(args, shape)
        bf16 = {mode: time_decode(model, args, mode) for mode in modes}
        hfqat.quantize_model(model, qconfig)
        model.eval()
        probe = torch.randint(0, model.config.vocab_size, (1, 32), device=args.device)
        with torch.no_grad():
            fake_logits = model(probe).logits.float()
        with tempfile.TemporaryDirectory() as tmp:
            hfqat.save_packed(model, tmp)
            del model
            packed = AutoModelForCausalLM.from_pretrained(tmp, device_map=args.device, dtype=args.dtype)
        chosen = prepare_backends(packed, args.dtype)
        with torch.no_grad():
            results["packed_vs_fake_quant_max_abs"] = float((packed(probe).logits.float() - fake_logits).abs().max())
        results["expert_backends"] = sorted({chosen[name] for name, _ in packed_experts(packed)})
        for mode in modes:
            suffix = "" if mode == "eager" else f"_{mode}"  # eager keeps the keys of earlier runs
            results[f"decode_bf16{suffix}"] = bf16[mode]
            results[f"decode_packed{suffix}"] = time_decode(packed, args, mode)
            ratio = results[f"decode_packed{suffix}"]["tok_s"] / bf16[mode]["tok_s"]
            results[f"decode_ratio{suffix}"] = ratio
            print(f"decode batch 1 ({mode}): bf16 {bf16[mode]['tok_s']:.1f} tok/s, packed W4 "
                  f"{results[f'decode_packed{suffix}']['tok_s']:.1f} tok/s -> x{ratio:.2f} (target >= 1.8); "
                  f"expert backends {results['expert_backends']}; packed vs fake-quant logits max |diff| "
                  f"{results['packed_vs_fake_quant_max_abs']:.3g}", flush=True)

    print(json.dumps(results, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_moe.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
