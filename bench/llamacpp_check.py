"""llama.cpp vs transformers on the same GGUF files: does llama.cpp run `hfqat.export_gguf`'s file as transformers does?

Not a test (it needs llama.cpp): a CPU check, run by hand. For each file, both runtimes get the same token ids
(SmolLM2's tokenizer) and are compared with teacher forcing on held-out text (the first ``--tokens`` tokens of each
licence in ``--texts``, /usr/share/common-licenses): per-position top-1 agreement, mean / max |logit difference|,
and each runtime's perplexity on that text; then greedy decoding for ``--steps`` tokens from a fixed prompt (how
many leading tokens agree). It also checks that llama.cpp's tokenizer (from the file's metadata) splits the text
into the same ids as transformers'. transformers runs in float32 on the file as its GGUF loader dequantizes it.

Files (all SmolLM2-135M):
  control  the embedded SmolLM2 Q4_1 GGUF (`hfqat.integrations.gguf.embedded_smollm2`, made by llama.cpp's tools):
           the agreement llama.cpp's own numerics allow at 4 bits (it quantizes activations to 8 bits in its
           quantized dot products and to F16 for F16 weights; transformers computes in float32).
  F32      `export_gguf` of the plain model (no QAT layers) with float_type="F32": every tensor float32, so
           llama.cpp's matmuls are float32 too; any difference here is the export's layout or metadata
           (q/k permutation, rope, norms, tied output), not quantization.
  Q8_0     `export_gguf` of QATConfig(weight_format="gguf", gguf_type="Q8_0") at round-to-nearest (no training).
  Q4_K     the same with gguf_type="Q4_K", gguf_fallback="llama.cpp" (Q5_0 where in_features % 256 != 0).

Install llama.cpp's Python binding from PyPI (it builds llama.cpp from the sdist; about 30-40 minutes on 2 cores):
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        pip install llama-cpp-python
(into hfqat's environment, or a separate one whose ``llama_cpp`` package folder is put on PYTHONPATH.)

Run (CPU):
    PYTHONPATH=. python bench/llamacpp_check.py --threads 2 --out bench/results/cpu_llamacpp_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfqat
from hfqat.integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint

LICENSES = Path("/usr/share/common-licenses")
PROMPT = "The GNU General Public License is"


def export_files(float_dir: Path, tokenizer, folder: Path) -> dict[str, Path]:
    """name -> GGUF path: the control file and hfqat's exports of the same model."""
    files = {"control Q4_1 (llama.cpp's file)": embedded_smollm2()}
    plain = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    files["F32 (export, no QAT)"] = hfqat.export_gguf(plain, folder / "f32" / "smollm2-f32.gguf", tokenizer,
                                                       float_type="F32", tokenizer_pre="smollm")
    del plain
    for gguf_type in ("Q8_0", "Q4_K"):
        config = hfqat.QATConfig(weight_format="gguf", gguf_type=gguf_type, gguf_fallback="llama.cpp")
        model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config, dtype=torch.float32)
        files[f"{gguf_type} (export, RTN)"] = hfqat.export_gguf(
            model, folder / gguf_type / f"smollm2-{gguf_type}.gguf", tokenizer, tokenizer_pre="smollm")
        del model
    return files


def nll_ppl(logits: np.ndarray, ids: list[int]) -> float:
    """Perplexity of ids[1:] under logits[:-1] (float64 log-softmax)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


class LlamaCpp:
    """llama.cpp (through llama-cpp-python) on one GGUF file: logits of a token sequence, greedy decoding."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(steps):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)


class Transformers:
    """transformers' GGUF loader (dequantized to float32) on the same file."""

    def __init__(self, path: Path):
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(torch.tensor([ids])).logits[0].float().numpy()

    @torch.no_grad()
    def greedy(self, ids: list[int], steps: int) -> list[int]:
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        return out[0, len(ids):].tolist()


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(path: Path, texts: dict[str, list[int]], prompt: list[int], strings: dict[str, str], args,
            tokenizer) -> dict:
    cpp, hf = LlamaCpp(path, args.tokens + args.steps + len(prompt), args.threads), Transformers(path)
    row: dict = {"file": str(path), "mib": round(path.stat().st_size / 2**20, 1), "texts": {}}
    for name, ids in texts.items():
        a, b = cpp.logits(ids), hf.logits(ids)
        diff = np.abs(a - b)
        row["texts"][name] = {
            "top1_agree": float((a.argmax(1) == b.argmax(1)).mean()),
            "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "ppl_llamacpp": nll_ppl(a, ids), "ppl_transformers": nll_ppl(b, ids),
            "same_tokenization": cpp.tokenize(strings[name]) == ids}
    g_cpp, g_hf = cpp.greedy(prompt, args.steps), hf.greedy(prompt, args.steps)
    row["greedy"] = {"agree_leading": leading_agreement(g_cpp, g_hf), "steps": args.steps,
                     "llamacpp": tokenizer.decode(g_cpp), "transformers": tokenizer.decode(g_hf)}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", nargs="+", default=["GPL-3", "Apache-2.0"], help="file names in " + str(LICENSES))
    p.add_argument("--tokens", type=int, default=512, help="teacher-forced tokens per text")
    p.add_argument("--steps", type=int, default=32, help="greedy tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "hfqat-smollm2-f32")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import llama_cpp  # fail before exporting anything when the binding is missing

    float_dir = gguf_to_float_checkpoint(embedded_smollm2(), args.cache)
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    texts, strings = {}, {}
    for name in args.texts:
        ids = tokenizer((LICENSES / name).read_text(), add_special_tokens=False)["input_ids"][: args.tokens]
        texts[name], strings[name] = ids, tokenizer.decode(ids)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    results = {"llama_cpp": llama_cpp.__version__, "torch": torch.__version__, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in export_files(float_dir, tokenizer, Path(tmp)).items():
            start = time.time()
            results["files"][name] = row = compare(path, texts, prompt, strings, args, tokenizer)
            row["seconds"] = round(time.time() - start, 1)
            print(name, json.dumps(row), flush=True)
    print(f"\nllama_cpp {llama_cpp.__version__}; {args.tokens} teacher-forced tokens per text; greedy {args.steps} "
          f"tokens from {PROMPT!r}\n")
    print("| file | text | top-1 agree | mean abs dlogit | max abs dlogit | ppl llama.cpp | ppl transformers | "
          "same tokens | greedy leading agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in results["files"].items():
        for text, t in row["texts"].items():
            print(f"| {name} | {text} | {t['top1_agree']:.1%} | {t['mean_abs_diff']:.4f} | {t['max_abs_diff']:.4f} | "
                  f"{t['ppl_llamacpp']:.3f} | {t['ppl_transformers']:.3f} | {t['same_tokenization']} | "
                  f"{row['greedy']['agree_leading']}/{row['greedy']['steps']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
