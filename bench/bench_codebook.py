"""Codebook (weight clustering) vs integer grid, side by side in one run on the embedded SmolLM2-135M.

CPU (what the codebook note quotes; ~15 min on a shared 2-core machine, 1 thread):
    python bench/bench_codebook.py
For every bit width (2/3/4) and format (int: symmetric grid, MSE-clipped scales; codebook: k-means centroids),
per output channel (group_size=-1), on the same float model:
- PTQ perplexity: int = round-to-nearest on the MSE-clipped grid (the grid QAT starts from); codebook = plain
  k-means, and Fisher-weighted k-means (SqueezeLLM: weights ``g²`` from a few calibration batches of the
  training text, `hfqat.quant.codebook.fisher_diagonal`), from which codebook QAT starts;
- QAT perplexity after the same budget: stock `Trainer` + `QATCallback` (distillation from the float snapshot,
  no re-allocation), same steps, tokens, data order, optimizer and schedule for every row;
- packed size (`save_packed`: the quantized linear layers alone, and the whole checkpoint file) and the packed
  reload's max |logit| difference from the fake-quant model;
- batch-1 greedy decode speed of the packed reload (transformers ``generate``, fp32, CPU: both formats run the
  exact gather/scale dequantize + matmul path there).
Perplexity: `hfqat.cli.evaluation.perplexity` on `stdlib_eval_text` (first ``--eval-tokens`` tokens).

Measured here (shared 2-core CPU, 1 thread, 609 s; FP ppl 13.86, FP linears 405 MB fp32, FP decode 15.9 tok/s):
    row          PTQ ppl   PTQ+Fisher   QAT ppl   linear MB   decode tok/s   packed reload max |Δlogit|
    int W2       9.26e6    –            2.80e6    25.9        4.0            0
    codebook W2  4.77e6    14679        2693      27.7        3.5            0
    int W3       1359      –            368.6     38.6        2.8            0
    codebook W3  718.4     51.7         34.7      42.7        2.1            0
    int W4       57.8      –            34.9      51.2        3.2            0
    codebook W4  58.7      21.0         18.8      60.1        3.3            0
Codebook QAT starts from the Fisher-weighted fit (4 blocks of 128 training tokens); int QAT from its MSE-clipped
grid. Plain k-means beats RTN at 2-3 bits (0.52x / 0.53x ppl) and ties at 4; Fisher weighting is the larger gain.
Codebook tables cost 2^bits fp32 per row (+7%, +11%, +17% linear bytes at 2/3/4 bits). CPU decode runs the exact
dequantize-per-call fallback for both formats (noisy on a shared machine).

GPU (kernels; random weights, no download or GGUF needed on the device):
    PYTHONPATH=. python bench/bench_codebook.py --gpu
Batch-1 GEMV times (CUDA-graph replays) of the Triton LUT kernel (`hfqat.export.kernels.triton_lut`) next to the int
Triton kernel and bf16 cuBLAS, for SmolLM2 and 8B-Llama layer shapes at 2/3/4 bits per channel; then greedy
decode of a SmolLM2-shaped model (random weights, bf16, static cache, whole token step in one CUDA graph).
Measured on an H100 (`--decode-tokens 32`; GEMV times in `hfqat/kernels/triton_lut.py`): decode tok/s
    bf16 348 | int W2 302, W3 279, W4 312 | codebook W2 188, W3 144, W4 107 (select-chain lookup) / 188 (gather)
SmolLM2's GEMVs are tiny (launch/latency-bound), so no low-bit variant beats bf16 there; the LUT kernel is 2-3x
slower than the int kernel per GEMV.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hfqat
from hfqat.export.codebook import PackedCodebookLinear
from hfqat.export.packed import PACKED_TYPES, PackedLinear, save_packed
from hfqat.quant.codebook import fisher_diagonal, fit_codebooks
from hfqat.train.callback import QATCallback

FORMATS = ("int", "codebook")


def _linear_bytes(model) -> int:
    """Bytes of the packed linear layers' tensors (codes/indices + scales/zeros/tables + bias)."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, PACKED_TYPES)
               for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False)))


def _float_linear_bytes(model, names) -> int:
    return sum(model.get_submodule(n).weight.numel() * 4 for n in names)


@torch.no_grad()
def _decode_speed(model, tok, n_tokens: int) -> float:
    model.eval()
    ids = tok("def quantize(weights, bits):", return_tensors="pt")["input_ids"]
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    model.generate(ids, max_new_tokens=2, **kw)  # warm-up: backend selection
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, **kw)
    return n_tokens / (time.perf_counter() - start)


def _train(model, dataset, args, out_dir) -> float:
    targs = TrainingArguments(
        str(out_dir), max_steps=args.qat_steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, args.qat_steps // 4),
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      callbacks=[QATCallback(reallocate_every=0, write_plots=False)])
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def run_cpu(args) -> dict:
    from hfqat.cli.data import pack_tokens, stdlib_eval_text, stdlib_train_text
    from hfqat.cli.evaluation import perplexity
    from hfqat.integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint

    t_start = time.perf_counter()
    torch.manual_seed(0)
    float_dir = gguf_to_float_checkpoint(embedded_smollm2(), args.cache)
    tok = AutoTokenizer.from_pretrained(float_dir)
    eval_text = stdlib_eval_text()
    blocks = pack_tokens(tok, stdlib_train_text(), args.seq_len, max_blocks=args.qat_steps * args.batch
                         + args.fisher_batches)
    calib = [torch.tensor([b]) for b in blocks[:args.fisher_batches]]
    dataset = [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in blocks[args.fisher_batches:]]
    probe = torch.tensor([blocks[0][:64]])

    def ppl(model) -> float:
        return perplexity(model, tok, eval_text, window=args.window, stride=args.window,
                          max_tokens=args.eval_tokens, progress=False)["ppl"]

    results = {"rows": {}, "settings": vars(args).copy()}
    fp = AutoModelForCausalLM.from_pretrained(float_dir)
    quantized = [n for n, m in fp.model.layers.named_modules(prefix="model.layers") if isinstance(m, torch.nn.Linear)]
    fp_row = {"ppl": ppl(fp), "linear_MB": _float_linear_bytes(fp, quantized) / 2**20,
              "file_MB": os.path.getsize(Path(float_dir) / "model.safetensors") / 2**20}
    fp_row["decode_tok_s"] = _decode_speed(fp, tok, args.decode_tokens)
    fisher = fisher_diagonal(fp, calib, names=quantized) if calib else None
    results["rows"]["FP"] = fp_row
    print(f"FP: ppl {fp_row['ppl']:.2f}  ({time.perf_counter() - t_start:.0f}s)", flush=True)
    del fp
    gc.collect()

    work = Path(tempfile.mkdtemp(prefix="bench_codebook-"))
    for bits in args.bits:
        for fmt in FORMATS:
            label = f"{fmt} W{bits}"
            extra = {"codebook_max_bits": max(args.bits)} if fmt == "codebook" else {}
            config = hfqat.QATConfig(bits=bits, group_size=args.group_size, weight_format=fmt, **extra)
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
            row = {"init_s": time.perf_counter() - t0, "ptq_ppl": ppl(model.eval())}
            if fmt == "codebook" and fisher is not None:
                fit_codebooks(model, fisher)  # QAT starts from the Fisher-weighted fit
                row["ptq_fisher_ppl"] = ppl(model.eval())
            row["qat_s"] = _train(model.train(), dataset, args, work / "run")
            row["qat_ppl"] = ppl(model.eval())
            out = save_packed(model, work / "packed")
            packed = AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                row["reload_max_abs_diff"] = (packed(probe).logits - model(probe).logits).abs().max().item()
            row["linear_MB"] = _linear_bytes(packed) / 2**20
            row["file_MB"] = os.path.getsize(out / "model.safetensors") / 2**20
            row["decode_tok_s"] = _decode_speed(packed, tok, args.decode_tokens)
            results["rows"][label] = row
            print(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items())
                  + f"  ({time.perf_counter() - t_start:.0f}s)", flush=True)
            del model, packed
            gc.collect()
    results["total_s"] = time.perf_counter() - t_start
    return results


def print_cpu_table(results: dict) -> None:
    rows = results["rows"]
    fp = rows["FP"]
    print(f"\nSmolLM2-135M, per channel; eval ppl on {results['settings']['eval_tokens']} tokens; QAT "
          f"{results['settings']['qat_steps']} steps x {results['settings']['batch']} x "
          f"{results['settings']['seq_len']} tokens; decode fp32 CPU batch 1, {results['settings']['threads']} thread(s)")
    head = (f"{'row':12s} {'PTQ ppl':>9s} {'PTQ+F ppl':>10s} {'QAT ppl':>9s} {'lin MB':>7s} {'x FP':>6s} "
            f"{'file MB':>8s} {'tok/s':>6s} {'x FP':>6s} {'reload diff':>11s}")
    print(head)
    print(f"{'FP':12s} {fp['ppl']:9.2f} {'':>10s} {'':>9s} {fp['linear_MB']:7.1f} {1.0:6.2f} {fp['file_MB']:8.1f} "
          f"{fp['decode_tok_s']:6.1f} {1.0:6.2f}")
    for bits in results["settings"]["bits"]:
        for fmt in FORMATS:
            r = rows[f"{fmt} W{bits}"]
            fisher = f"{r['ptq_fisher_ppl']:10.2f}" if "ptq_fisher_ppl" in r else f"{'–':>10s}"
            print(f"{fmt + ' W' + str(bits):12s} {r['ptq_ppl']:9.2f} {fisher} {r['qat_ppl']:9.2f} "
                  f"{r['linear_MB']:7.1f} {r['linear_MB'] / fp['linear_MB']:6.3f} {r['file_MB']:8.1f} "
                  f"{r['decode_tok_s']:6.1f} {r['decode_tok_s'] / fp['decode_tok_s']:6.2f} "
                  f"{r['reload_max_abs_diff']:11.1e}")
        cb, it = rows[f"codebook W{bits}"], rows[f"int W{bits}"]
        print(f"{'  cb/int':12s} {cb['ptq_ppl'] / it['ptq_ppl']:9.3f} {'':>10s} {cb['qat_ppl'] / it['qat_ppl']:9.3f} "
              f"{cb['linear_MB'] / it['linear_MB']:7.3f} {'':>6s} {'':>8s} {cb['decode_tok_s'] / it['decode_tok_s']:6.2f}")


# -- GPU ---------------------------------------------------------------------------------------------------------
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
               rope_theta=100000.0)
SHAPES = {"smollm2 q/o 576x576": (576, 576), "smollm2 up 1536x576": (1536, 576),
          "smollm2 down 576x1536": (576, 1536), "8B q/o 4096x4096": (4096, 4096),
          "8B up 14336x4096": (14336, 4096), "8B down 4096x14336": (4096, 14336)}


def run_gpu(args) -> dict:
    from triton.testing import do_bench_cudagraph

    torch.manual_seed(0)
    dtype = torch.bfloat16
    results = {"gemv_us": {}, "gemv_rel_err": {}, "decode": {}}
    for label, (n, k) in SHAPES.items():
        linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float32)
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        w16 = linear.weight.to(dtype)
        times = {"bf16": do_bench_cudagraph(lambda: F.linear(x, w16), rep=20)}
        for bits in args.bits:
            for name, layer, backend in (
                    (f"int W{bits}", PackedLinear.from_float(linear, bits, -1, True, scale_init="minmax"), "triton"),
                    (f"cb W{bits}", PackedCodebookLinear.from_float(linear, bits, -1), "triton_lut")):
                layer.force_backend = "dequant"
                ref = layer(x.float()).float()
                layer.force_backend = backend
                got = layer(x).float()
                results["gemv_rel_err"][f"{label} {name}"] = ((got - ref).norm() / ref.norm()).item()
                times[name] = do_bench_cudagraph(lambda layer=layer: layer(x), rep=20)
        results["gemv_us"][label] = {name: 1e3 * t for name, t in times.items()}
        print(f"{label:24s} " + "  ".join(f"{name} {1e3 * t:6.1f}us" for name, t in times.items()), flush=True)
        del linear
        torch.cuda.empty_cache()
    results["decode"] = _gpu_decode(args)
    return results


def _gpu_decode(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import StaticDecoder, _layer_step
    from transformers import LlamaConfig

    from hfqat.export.packed import prepare_backends

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2), dtype=torch.bfloat16).cuda().eval()
    # fp32 copies of the decoder linears: the packed variants are quantized from these
    originals = {n: copy.deepcopy(m).float() for n, m in model.model.layers.named_modules()
                 if isinstance(m, torch.nn.Linear)}
    out = {}

    def timed(label):
        prepare_backends(model, torch.bfloat16)
        with torch.no_grad():
            dec = StaticDecoder(model, args.decode_tokens + 8, _layer_step)
            dec.generate(2)
            dec.capture()
            dec.generate(args.decode_tokens)
            _, seconds = dec.generate(args.decode_tokens)
        out[label] = args.decode_tokens / seconds
        print(f"decode {label:8s} {out[label]:8.1f} tok/s", flush=True)

    timed("bf16")
    for bits in args.bits:
        for label, make in ((f"int W{bits}", lambda m, b=bits: PackedLinear.from_float(m, b, -1, True, "minmax")),
                            (f"cb W{bits}", lambda m, b=bits: PackedCodebookLinear.from_float(m, b, -1))):
            for name, module in originals.items():
                model.model.layers.set_submodule(name, make(module))
            timed(label)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="kernel + decode benchmark on CUDA (random weights)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group-size", type=int, default=-1)
    parser.add_argument("--qat-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--fisher-batches", type=int, default=4, help="calibration blocks for Fisher-weighted k-means")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: on a shared 2-core machine 1 thread ran 2x faster than 2)")
    parser.add_argument("--cache", default="/tmp/smollm2_f32", help="float checkpoint cache of the embedded GGUF")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if not args.gpu:
        torch.set_num_threads(args.threads)
    results = run_gpu(args) if args.gpu else run_cpu(args)
    if not args.gpu:
        print_cpu_table(results)
    results["command"] = command
    print(f"\nreproduce: {command}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
