"""Foundation benchmark: fake-quant layer overhead and RTN-init quality, side by side in one run.

1. forward+backward time of one 4096x4096 layer: nn.Linear vs QATLinear (STE, soft, +int8 activations),
   on CPU in fp32 and (when present) CUDA in bf16;
2. SmolLM2-135M (embedded GGUF) perplexity on held-out stdlib text: FP vs RTN init with min/max vs MSE
   clip search, at W4 g64 and W3 g64 (what the default `scale_init` is based on).

Run: python bench/bench_fake_quant.py [--skip-ppl] [--max-eval-tokens N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn as nn

from hfqat.config import QATConfig
from hfqat.quant.layers import QATLinear

VARIANTS = {
    "QATLinear W4 g128 ste": {},
    "QATLinear W4 g128 soft round+clamp": dict(rounding="soft", clamping="soft"),
    "QATLinear W4 g128 ste + A8": dict(activation_bits=8),
}


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, iters: int) -> float:
    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).float().sum().backward()

    for _ in range(2):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def layer_overhead(device: str, dtype: torch.dtype, tokens: int, iters: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(4096, 4096, bias=False, device=device, dtype=dtype)
    x = torch.randn(tokens, 4096, device=device, dtype=dtype, requires_grad=True)
    ref = time_fwd_bwd(base, x, iters)
    print(f"\n### 4096x4096 layer, forward+backward, {tokens} tokens, {device} {dtype}")
    print("| layer | ms / step | vs nn.Linear |\n|---|---:|---:|")
    print(f"| nn.Linear | {ref * 1e3:.2f} | 1.00x |")
    for label, kwargs in VARIANTS.items():
        spec = QATConfig(bits=4, group_size=128, **kwargs).spec_for("layer", 4096)
        layer = QATLinear.from_float(nn.Linear(4096, 4096, bias=False, device=device, dtype=dtype), spec)
        with torch.no_grad():
            layer.weight.copy_(base.weight)
        layer.reset_quant_params()
        t = time_fwd_bwd(layer.train(), x, iters)
        print(f"| {label} | {t * 1e3:.2f} | {t / ref:.2f}x |")


def rtn_quality(max_eval_tokens: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfqat.cli.data import stdlib_eval_text
    from hfqat.cli.evaluation import perplexity
    from hfqat.integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint

    float_dir = gguf_to_float_checkpoint(embedded_smollm2(), tempfile.gettempdir() + "/hfqat-smollm2-f32")
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    text = stdlib_eval_text()

    def ppl(config: QATConfig | None) -> float:
        model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
        return perplexity(model.eval(), tokenizer, text, max_tokens=max_eval_tokens, progress=False)["ppl"]

    fp = ppl(None)
    print(f"\n### SmolLM2-135M RTN init, ppl on held-out stdlib docstrings ({max_eval_tokens} tokens)")
    print("| weights | scale init | ppl | vs FP |\n|---|---|---:|---:|")
    print(f"| FP (fp32) | - | {fp:.3f} | 1.000x |")
    for bits in (4, 3):
        for init in ("minmax", "mse"):
            p = ppl(QATConfig(bits=bits, group_size=64, scale_init=init))
            print(f"| W{bits} g64 sym | {init} | {p:.3f} | {p / fp:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    print(f"command: python {' '.join(sys.argv)}\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    layer_overhead("cpu", torch.float32, tokens=256, iters=3)
    if torch.cuda.is_available():
        layer_overhead("cuda", torch.bfloat16, tokens=8192, iters=20)
    if not args.skip_ppl:
        rtn_quality(args.max_eval_tokens)


if __name__ == "__main__":
    main()
