"""Decode and prefill speed of packed hfqat models vs bf16, side by side in one run.

GPU (the figures in the export issue):
    PYTHONPATH=. python bench/bench_decode.py --device cuda
builds an 8B-Llama-shaped model (hidden 4096, intermediate 14336, 32 layers, 32/8 heads, vocab 128256) with
random weights directly on the GPU, then for bf16 and for hfqat packed layers (group 128, symmetric, min-max
scales) runs batch-1 greedy decode of 256 tokens with a static KV cache: each decoder layer compiled with
torch.compile (one region reused by all layers), the whole token step captured in one CUDA graph.
Variants: W4 (automatic backend: tinygemm), W4 with the Triton kernel forced, W3, W2 (Triton), and W4 with the
lm_head quantized too (hfqat keeps lm_head bf16 by default; every other variant does). Prefill is a batch of
16 prompts of 128 tokens through the plain transformers forward (bf16; W4 with dequantize+cuBLAS; W4 with the
fused Triton GEMM). Also prints per-shape GEMV times and accuracy, and a Triton-vs-dequantize check of the
first decode step's logits.

Measured on an H100 80GB (torch 2.11, triton 3.6, transformers 5.17), full 32 layers, 256 tokens:
    bf16 143.0 tok/s | W4 (tinygemm) 260.6, x1.82 | W4 forced Triton 215.0, x1.50 | W3 170.3, x1.19 |
    W2 235.9, x1.65 | W4 incl. lm_head 280.3, x1.96; prefill 16x128: W4 x0.88 of bf16 (dequantize+cuBLAS).
Per token (estimated from the kernel table), bf16 spends ~5.6 ms in GEMVs + lm_head and ~1.4 ms elsewhere (norms,
rope, attention, launches); that fixed part caps W4 at ~2.3x even with its GEMVs at full HBM bandwidth.

CPU (SmolLM2-135M: fp32 and bf16 vs W4 g64 packed with bf16 activations, i.e. `_weight_int4pack_mm_for_cpu`;
transformers generate, greedy):
    PYTHONPATH=. python bench/bench_decode.py --cpu-smollm2

Check that the hand-written decode loop equals transformers' greedy `generate` (tiny model, CPU):
    PYTHONPATH=. python bench/bench_decode.py --check
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hfqat  # noqa: F401
from hfqat.export.packed import (
    PackedLinear,
    backends_in_use,
    prepare_backends,
    set_backend,
)

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)


def _layer_step(layer, h, cos, sin, k_cache, v_cache, pos, mask):
    """One Llama decoder layer for one token with a static cache (GQA as grouped queries per KV head)."""
    attn = layer.self_attn
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, 1, n_kv, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, 1, n_kv, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    o = F.scaled_dot_product_attention(q.reshape(1, n_kv, -1, head_dim), k_cache, v_cache, attn_mask=mask)
    h = h + attn.o_proj(o.reshape(1, 1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class StaticDecoder:
    """Greedy batch-1 decode with a static KV cache; on CUDA the whole token step is one CUDA graph."""

    def __init__(self, model, max_len: int, layer_fn):
        cfg = model.config
        self.model, self.layer_fn, self.max_len = model, layer_fn, max_len
        device, dtype = model.device, model.dtype
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        shape = (1, cfg.num_key_value_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in model.model.layers]
        self.positions = torch.arange(max_len, device=device)
        self.tok = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(max_len, dtype=torch.long, device=device)
        self.graph = None

    def logits(self, tok, pos):
        m = self.model.model
        h = m.embed_tokens(tok.view(1, 1))
        cos, sin = m.rotary_emb(h, pos.view(1, 1))
        mask = torch.where(self.positions <= pos, 0.0, float("-inf")).to(h.dtype).view(1, 1, 1, -1)
        for i, layer in enumerate(m.layers):
            h = self.layer_fn(layer, h, cos, sin, self.k[i], self.v[i], pos, mask)
        return self.model.lm_head(m.norm(h))[0, -1]

    def _step(self):
        nxt = self.logits(self.tok, self.pos).argmax(-1, keepdim=True)
        self.out.index_copy_(0, self.pos, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    def reset(self, first_token: int = 1):
        self.tok.fill_(first_token)
        self.pos.zero_()

    def capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def generate(self, n_tokens: int) -> tuple[list[int], float]:
        """(tokens, seconds) for n greedy tokens after token id 1."""
        self.reset()
        if self.graph is None:
            start = time.perf_counter()
            for _ in range(n_tokens):
                self._step()
            return self.out[:n_tokens].tolist(), time.perf_counter() - start
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(n_tokens):
            self.graph.replay()
        end.record()
        torch.cuda.synchronize()
        return self.out[:n_tokens].tolist(), begin.elapsed_time(end) / 1e3


# -- model surgery --------------------------------------------------------------------------------------------
def decoder_linears(model) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, (nn.Linear, PackedLinear))]


def swap_in(model, make) -> None:
    for name, module in decoder_linears(model):
        model.model.layers.set_submodule(name, make(name, module))


def packed_variant(originals: dict, bits: int, group_size: int):
    def make(name, _):
        return PackedLinear.from_float(originals[name], bits, group_size, True, scale_init="minmax")
    return make


def linear_bytes(model) -> int:
    total = 0
    for _, m in decoder_linears(model):
        tensors = [m.weight] if isinstance(m, nn.Linear) else [m.qweight, m.scales, m.zeros]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


# -- GPU benchmark ----------------------------------------------------------------------------------------------
def _setup_dynamo():
    import torch._dynamo.config as dc

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 256)


def _decode(model, args, compiled, label, results, log):
    t0 = time.perf_counter()
    prepare_backends(model, model.dtype)  # kernel set-up stays out of the compiled region and the graph
    layer_fn, mode = compiled, "compile+graph"
    try:
        dec = StaticDecoder(model, args.tokens + 8, layer_fn)
        dec.generate(2)  # eager warm-up outside the graph: backend selection, compilation
        dec.capture()
    except Exception as err:  # keep the run going; say what happened
        log(f"  {label}: compile/graph failed ({type(err).__name__}: {str(err)[:300]}); eager + graph")
        layer_fn, mode = _layer_step, "eager+graph"
        dec = StaticDecoder(model, args.tokens + 8, layer_fn)
        dec.generate(2)
        dec.capture()
    setup = time.perf_counter() - t0
    dec.generate(args.tokens)  # one timed warm run
    tokens, seconds = dec.generate(args.tokens)
    tps = args.tokens / seconds
    results["decode"][label] = {"tokens_per_s": tps, "ms_per_token": 1e3 * seconds / args.tokens, "mode": mode,
                                "setup_s": setup, "first_tokens": tokens[:8],
                                "linear_GB": linear_bytes(model) / 1e9}
    log(f"  {label:14s} {tps:8.1f} tok/s  {1e3 * seconds / args.tokens:6.2f} ms/token  ({mode}, setup {setup:.0f}s)")
    del dec
    torch.cuda.empty_cache()
    return tokens


def _prefill(model, args, label, results, log):
    ids = torch.randint(0, model.config.vocab_size, (args.prefill_batch, args.prefill_len), device=model.device)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(3):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        end.record()
        torch.cuda.synchronize()
    seconds = begin.elapsed_time(end) / 3e3
    tps = ids.numel() / seconds
    results["prefill"][label] = {"tokens_per_s": tps, "ms": seconds * 1e3}
    log(f"  {label:14s} {tps:10.0f} tok/s  {seconds * 1e3:7.1f} ms per batch of {tuple(ids.shape)}")


def _kernel_table(model, originals, results, log, label):
    """Per-shape GEMV time (CUDA graph replays) of bf16 F.linear vs the packed layers, and their accuracy."""
    from triton.testing import do_bench_cudagraph

    seen = {}
    for name, m in decoder_linears(model):
        seen.setdefault((m.out_features, m.in_features), (name, m))
    for (n, k), (name, packed) in seen.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = originals[name].weight
        t_bf16 = do_bench_cudagraph(lambda x=x, w=w: F.linear(x, w)) * 1e-3
        t_packed = do_bench_cudagraph(lambda x=x, packed=packed: packed(x)) * 1e-3
        ref = x.double() @ packed.dequantized_weight().double().t()
        rel = ((packed(x).double() - ref).norm() / ref.norm()).item()
        nbytes = sum(t.numel() * t.element_size() for t in (packed.qweight, packed.scales) if t is not None)
        row = {"bf16_us": t_bf16 * 1e6, "packed_us": t_packed * 1e6, "bf16_GBps": w.numel() * 2 / t_bf16 / 1e9,
               "packed_GBps": nbytes / t_packed / 1e9, "speedup": t_bf16 / t_packed, "backend": packed.backend,
               "rel_err_vs_fp64": rel}
        results["kernels"].setdefault(label, {})[f"{n}x{k}"] = row
        log(f"  {label:10s} {packed.backend:8s} N={n:5d} K={k:5d}: bf16 {row['bf16_us']:6.1f} us "
            f"({row['bf16_GBps']:5.0f} GB/s)  packed {row['packed_us']:6.1f} us ({row['packed_GBps']:5.0f} GB/s)"
            f"  x{row['speedup']:.2f}  rel err {rel:.1e}")


def _tune(model, log):
    from hfqat.export.kernels import triton_lowbit

    seen = set()
    for _, m in decoder_linears(model) + [("lm_head", model.lm_head)]:
        key = (m.out_features, m.in_features, getattr(m, "bits", None))
        if isinstance(m, PackedLinear) and key not in seen:
            seen.add(key)
            triton_lowbit.tune_gemv(m, torch.bfloat16, verbose=True)


# (label, bits, forced backend, also quantize lm_head)
VARIANTS = (("W4", 4, None, False), ("W4-triton", 4, "triton", False), ("W3", 3, None, False),
            ("W2", 2, None, False), ("W4+head", 4, None, True))


def run_gpu(args):
    from hfqat.export.kernels import triton_lowbit

    start = time.perf_counter()
    results = {"device": torch.cuda.get_device_name(), "args": vars(args), "decode": {}, "prefill": {},
               "kernels": {}, "checks": {}, "torch": torch.__version__}
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    _setup_dynamo()
    cfg = LlamaConfig(**dict(LLAMA_8B, num_hidden_layers=args.layers))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    torch.set_grad_enabled(False)
    originals = dict(decoder_linears(model))
    head = model.lm_head
    log(f"built {args.layers}-layer 8B-shaped model in {time.perf_counter() - start:.0f}s on {results['device']}; "
        f"decoder linear weights {linear_bytes(model) / 1e9:.2f} GB bf16")
    compiled = torch.compile(_layer_step, dynamic=False) if args.compile else _layer_step

    log("decode (batch 1, greedy, static cache):")
    _decode(model, args, compiled, "bf16", results, log)
    log("prefill:")
    _prefill(model, args, "bf16", results, log)
    for label, bits, backend, quantize_head in VARIANTS:
        if time.perf_counter() - start > args.budget_s:
            log(f"  (time budget reached: {label} skipped)")
            continue
        swap_in(model, packed_variant(originals, bits, 128))
        if quantize_head:
            model.lm_head = PackedLinear.from_float(head, bits, 128, True, scale_init="minmax")
        set_backend(model, backend)
        _tune(model, log)
        if label == "W4-triton":
            # correctness: the Triton kernels vs the exact dequantize fallback on the same packed weights
            dec = StaticDecoder(model, 8, _layer_step)
            fast = dec.logits(dec.tok.fill_(1), dec.pos.zero_()).float()
            set_backend(model, "dequant")
            exact = dec.logits(dec.tok, dec.pos).float()
            set_backend(model, backend)
            rel = ((fast - exact).norm() / exact.norm()).item()
            results["checks"]["W4 triton vs dequant (bf16), step-1 logits rel err"] = rel
            log(f"  check W4: triton vs dequant (both bf16) first-step logits rel err {rel:.2e} "
                f"(argmax {int(fast.argmax())} vs {int(exact.argmax())})")
            del dec
        log(f"decode {label} g128:")
        _decode(model, args, compiled, label, results, log)
        log(f"  backends: {sorted(set(backends_in_use(model).values()))}")
        if not quantize_head:
            _kernel_table(model, originals, results, log, label)
        if label == "W4":
            log("prefill:")
            _prefill(model, args, "W4 (dequant+cuBLAS)", results, log)
            triton_lowbit.FUSED_LARGE_M = True
            _prefill(model, args, "W4 (fused GEMM)", results, log)
            triton_lowbit.FUSED_LARGE_M = False
        swap_in(model, lambda name, _: originals[name])
        model.lm_head = head
        torch.cuda.empty_cache()
    base = results["decode"]["bf16"]["tokens_per_s"]
    log("\n== summary (tokens/s, ratio vs bf16) ==")
    for label, row in results["decode"].items():
        log(f"decode  {label:22s} {row['tokens_per_s']:8.1f}  x{row['tokens_per_s'] / base:.2f}  "
            f"{row['ms_per_token']:.2f} ms/token  decoder linear weights {row['linear_GB']:.2f} GB")
    pbase = results["prefill"]["bf16"]["tokens_per_s"]
    for label, row in results["prefill"].items():
        log(f"prefill {label:22s} {row['tokens_per_s']:8.0f}  x{row['tokens_per_s'] / pbase:.2f}")
    log(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    log(f"total {time.perf_counter() - start:.0f}s; command: PYTHONPATH=. python bench/bench_decode.py --device cuda "
        f"--layers {args.layers} --tokens {args.tokens}")
    return results


# -- CPU (SmolLM2) ----------------------------------------------------------------------------------------------
def run_cpu_smollm2(args):
    from transformers import AutoTokenizer

    from hfqat.export.packed import save_packed
    from hfqat.integrations.gguf import embedded_smollm2, load_gguf_for_qat

    torch.set_num_threads(args.threads or torch.get_num_threads())
    qat, _ = load_gguf_for_qat(embedded_smollm2(), hfqat.QATConfig(bits=4, group_size=64, scale_init="minmax"),
                            args.smollm2_dir)
    packed_dir = os.path.join(args.smollm2_dir, "..", "smollm2_w4g64_packed")
    save_packed(qat.eval(), packed_dir)
    tok = AutoTokenizer.from_pretrained(args.smollm2_dir)
    ids = tok("The Python language reference says", return_tensors="pt").input_ids
    models = {"fp32": AutoModelForCausalLM.from_pretrained(args.smollm2_dir, dtype=torch.float32).eval(),
              "bf16": AutoModelForCausalLM.from_pretrained(args.smollm2_dir, dtype=torch.bfloat16).eval(),
              "W4g64-packed-bf16": AutoModelForCausalLM.from_pretrained(packed_dir, dtype=torch.bfloat16).eval()}
    results = {"decode": {}}
    for _ in range(args.rounds):  # interleaved rounds, best of each: a shared CPU is noisy
        for label, model in models.items():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=4, do_sample=False)
                start = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.cpu_tokens, min_new_tokens=args.cpu_tokens,
                                     do_sample=False)
                tps = args.cpu_tokens / (time.perf_counter() - start)
            best = results["decode"].get(label, {}).get("tokens_per_s", 0.0)
            results["decode"][label] = {"tokens_per_s": max(tps, best),
                                        "text": tok.decode(out[0, ids.shape[1]:])[:80]}
    for label, model in models.items():
        backends = sorted({b for b in backends_in_use(model).values() if b})
        row = results["decode"][label]
        print(f"{label:18s} {row['tokens_per_s']:7.1f} tok/s  backends {backends or '-'}  {row['text']!r}")
    speed = {label: row["tokens_per_s"] for label, row in results["decode"].items()}
    results["ratio_vs_bf16"] = speed["W4g64-packed-bf16"] / speed["bf16"]
    results["ratio_vs_fp32"] = speed["W4g64-packed-bf16"] / speed["fp32"]
    print(f"CPU decode ratio W4 packed (bf16 activations): x{results['ratio_vs_bf16']:.2f} vs bf16, "
          f"x{results['ratio_vs_fp32']:.2f} vs fp32 ({torch.get_num_threads()} threads, {args.cpu_tokens} tokens); "
          "command: PYTHONPATH=. python bench/bench_decode.py --cpu-smollm2")
    return results


def run_check():
    """The hand-written static-cache decode equals transformers' greedy generate (tiny random Llama, fp32)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(LLAMA_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    swap_in(model, lambda name, m: PackedLinear.from_float(m, 4, 32, True))
    with torch.no_grad():
        ref = model.generate(torch.tensor([[1]]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 1:]
        tokens, _ = StaticDecoder(model, 32, _layer_step).generate(24)
    assert tokens == ref.tolist(), (tokens, ref.tolist())
    print("check ok: static decoder == generate:", tokens[:12])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=128)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--budget-s", type=float, default=420, help="skip remaining variants after this")
    parser.add_argument("--cpu-smollm2", action="store_true")
    parser.add_argument("--smollm2-dir", default="/tmp/smollm2_f32")
    parser.add_argument("--cpu-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    if args.check:
        return run_check()
    results = run_cpu_smollm2(args) if args.cpu_smollm2 else run_gpu(args)
    if args.out:
        name = "bench_decode_cpu.json" if args.cpu_smollm2 else "bench_decode.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
