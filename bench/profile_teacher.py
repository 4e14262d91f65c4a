"""Where the distillation teacher's cost goes (GPU): teacher forward (eager, inference mode, compiled) and the KL with
its gradient (fused Triton kernel, chunked torch code, plain fp32 formula), next to a plain bf16 train step.

Llama 1B shape (bench_qat_speed's default), batch 8 x 2048 tokens, bf16, CUDA-event medians.
Run: python bench/profile_teacher.py [--quick: skip the torch.compile row]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from bench_w8a8 import median_ms_timer
from transformers import AutoModelForCausalLM, LlamaConfig

from hfqat.train import fused_kl
from hfqat.train.distillation import distillation_loss


def main() -> None:
    print("command: python", " ".join(sys.argv), flush=True)
    timed = median_ms_timer("cuda", warmup=3, iters=6)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    ids = torch.randint(0, 32000, (8, 2048), device="cuda")

    def teacher_forward(m):
        return lambda: m(input_ids=ids, use_cache=False).logits

    model.eval()
    with torch.no_grad():
        print(f"teacher forward, eager, no_grad: {timed(teacher_forward(model)):.1f} ms", flush=True)
    with torch.inference_mode():
        print(f"teacher forward, eager, inference_mode: {timed(teacher_forward(model)):.1f} ms", flush=True)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def train_step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(f"plain bf16 train step: {timed(train_step):.1f} ms", flush=True)

    student = torch.randn(8, 2048, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(8, 2048, 32000, device="cuda", dtype=torch.bfloat16)

    def kl():
        distillation_loss(student, teacher, 1.0, ids).backward()

    def kl_plain():
        log_s, log_t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
        (log_t.exp() * (log_t - log_s)).sum(-1).mean().backward()

    print(f"KL + gradient, fused Triton kernel: {timed(kl):.1f} ms", flush=True)
    fused_kl.ENABLED = False
    print(f"KL + gradient, chunked torch code: {timed(kl):.1f} ms", flush=True)
    fused_kl.ENABLED = True
    print(f"KL + gradient, plain fp32 formula: {timed(kl_plain):.1f} ms", flush=True)
    if "--quick" in sys.argv:
        return
    model.eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        start = time.time()
        compiled(input_ids=ids, use_cache=False)
        print(f"torch.compile of the teacher: {time.time() - start:.1f} s", flush=True)
        print(f"teacher forward, compiled, no_grad: {timed(teacher_forward(compiled)):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
