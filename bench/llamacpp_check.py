"""llama.cpp vs transformers on the same GGUF files: does llama.cpp run `hfqat.export_gguf`'s file as transformers does?

Not a test (it needs llama.cpp): a CPU check, run by hand. For each file, both runtimes get the same token ids
(SmolLM2's tokenizer) and are compared with teacher forcing on held-out text (the first ``--tokens`` tokens of each
licence in ``--texts``, /usr/share/common-licenses): per-position top-1 agreement, mean / max |logit difference|,
and each runtime's perplexity on that text; then greedy decoding for ``--steps`` tokens from a fixed prompt (how
many leading tokens agree). It also checks that llama.cpp's tokenizer (from the file's metadata) splits the text
into the same ids as transformers'. transformers runs in float32 on the file as its GGUF loader dequantizes it.

Then (``--parts tiny``) tiny random llamas whose configs use what SmolLM2 does not - head_dim != hidden / heads,
q/k/v biases, llama3 and linear rope scaling - exported in float32 and run by llama.cpp against the original
transformers model (not a reload: transformers' GGUF loader drops biases and rope scaling of llama files).

Two diagnostics tell a wrong file from llama.cpp's own arithmetic:
  * ggml's dequantizer (``ggml_get_type_traits(type)->to_float`` from llama.cpp's libggml-base) against gguf-py's
    (what transformers' loader and hfqat's tests use) on every quantized tensor of the file: bit-identical or not;
  * transformers again with the activation rounding of ggml's CPU matmuls simulated (each linear layer's input
    quantized to its weight type's ``vec_dot_type``: Q8_0 blocks for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for Q4_1/Q5_1, Q8_K
    super-blocks for the K-quants, F16 for F16 weights; keys and values rounded to F16 as in llama.cpp's KV cache):
    how far that rounding alone moves transformers' logits is the size of gap llama.cpp's numerics make by
    themselves (the simulation is not bit-exact - rounding order, flash attention, F16 keys after rope - so it
    measures the size of the perturbation, it does not reproduce llama.cpp's logits).

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
    PYTHONPATH=. python bench/llamacpp_check.py --threads 2 --parts tiny
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

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


class _TypeTraits(ctypes.Structure):  # ggml.h's struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def ggml_library():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_version.restype = lib.ggml_commit.restype = ctypes.c_char_p
    return lib


def ggml_dequantize_matches(path: Path) -> dict[str, str]:
    """type -> "identical/total" tensors where ggml's to_float equals gguf-py's dequantize bit for bit."""
    import gguf

    lib, counts = ggml_library(), {}
    to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        raw = np.ascontiguousarray(t.data)
        ours = np.empty(int(t.n_elements), dtype=np.float32)
        to_float = to_float_t(lib.ggml_get_type_traits(int(t.tensor_type)).contents.to_float)
        to_float(raw.ctypes.data, ours.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), ours.size)
        same = np.array_equal(ours, gguf.quants.dequantize(raw, t.tensor_type).reshape(-1))
        done, total = counts.get(t.tensor_type.name, (0, 0))
        counts[t.tensor_type.name] = (done + same, total + 1)
    return {k: f"{a}/{b}" for k, (a, b) in counts.items()}


# ggml-cpu's vec_dot_type: what a matmul's activations are quantized to for each weight type
ACTIVATION_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                   "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "F16": "F16"}


def ggml_round_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x as ggml's quantize_row_q8_0 / q8_1 (32-value blocks, d = amax / 127 stored F16) or q8_K (256-value blocks,
    d = -max / 127 of the largest-magnitude value, F32) leaves it, dequantized; or rounded to F16."""
    if kind == "F16":
        return x.half().float()
    block = 256 if kind == "Q8_K" else 32
    v = x.float().reshape(-1, block)
    if kind == "Q8_K":
        big = v.gather(1, v.abs().argmax(1, keepdim=True))
        iscale = torch.where(big != 0, -127.0 / big, torch.zeros_like(big))
        q = torch.round(iscale * v).clamp(max=127)
        d = torch.where(big != 0, 1 / iscale, torch.zeros_like(big))
    else:
        d = v.abs().amax(1, keepdim=True) / 127
        q = torch.round(v * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
        d = d.half().float()
    return (q * d).reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def ggml_activation_rounding(model: torch.nn.Module, path: Path):
    """Hooks: every linear layer's input rounded as ggml rounds it for that layer's weight type in the file, and
    k/v projections' outputs to F16 (llama.cpp's KV cache)."""
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        file_name = (names.get_name(name) or "") + ".weight"
        kind = ACTIVATION_TYPE.get(types.get(file_name, types["token_embd.weight"]))  # tied head: the embedding
        if kind is not None:
            handles.append(module.register_forward_pre_hook(
                lambda _, args, kind=kind: (ggml_round_activations(args[0], kind),)))
        if name.endswith(("k_proj", "v_proj")):
            handles.append(module.register_forward_hook(lambda _, __, out: out.half().float()))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
        self.path = path
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(torch.tensor([ids])).logits[0].float().numpy()

    def logits_as_ggml_rounds(self, ids: list[int]) -> np.ndarray:
        with ggml_activation_rounding(self.model, self.path):
            return self.logits(ids)

    @torch.no_grad()
    def greedy(self, ids: list[int], steps: int) -> list[int]:
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        return out[0, len(ids):].tolist()


def leading_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(path: Path, texts: dict[str, list[int]], prompt: list[int], strings: dict[str, str], args,
            tokenizer) -> dict:
    cpp, hf = LlamaCpp(path, args.tokens + args.steps + len(prompt), args.threads), Transformers(path)
    row: dict = {"file": str(path), "mib": round(path.stat().st_size / 2**20, 1),
                 "ggml_dequantize_identical": ggml_dequantize_matches(path), "texts": {}}
    for name, ids in texts.items():
        a, b, c = cpp.logits(ids), hf.logits(ids), hf.logits_as_ggml_rounds(ids)
        diff = np.abs(a - b)
        row["texts"][name] = {
            "top1_agree": float((a.argmax(1) == b.argmax(1)).mean()),
            "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "rounding_alone_mean_abs_diff": float(np.abs(b - c).mean()),
            "rounding_alone_top1_agree": float((b.argmax(1) == c.argmax(1)).mean()),
            "ppl_llamacpp": nll_ppl(a, ids), "ppl_transformers": nll_ppl(b, ids),
            "same_tokenization": cpp.tokenize(strings[name]) == tokenizer(strings[name], add_special_tokens=False)[
                "input_ids"]}
    g_cpp, g_hf = cpp.greedy(prompt, args.steps), hf.greedy(prompt, args.steps)
    cpp.llm.close()
    same = leading_agreement(g_cpp, g_hf)
    row["greedy"] = {"agree_leading": same, "steps": args.steps,
                     "llamacpp": tokenizer.decode(g_cpp), "transformers": tokenizer.decode(g_hf)}
    if same < args.steps:  # how close transformers' own top two were where the two runtimes parted
        last = hf.logits(prompt + g_hf[:same])[-1]
        row["greedy"]["transformers_margin_at_split"] = float(last[g_hf[same]] - last[g_cpp[same]])
    return row


TINY_CASES = {
    "head_dim 32 (hidden / heads = 16)": {"head_dim": 32},
    "q/k/v biases": {"attention_bias": True},
    "llama3 rope scaling": {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "linear rope scaling x4": {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
}


@torch.no_grad()
def tiny_architecture_checks(tokenizer, folder: Path, threads: int, n_tokens: int = 200) -> dict[str, dict]:
    """case -> llama.cpp vs the original transformers model on a float32 export of a tiny random llama."""
    rows = {}
    for case, extra in TINY_CASES.items():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False, initializer_range=0.2, **extra)
        model = AutoModelForCausalLM.from_config(config).eval()
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)  # large enough that a misplaced bias row changes the attention
        path = hfqat.export_gguf(model, folder / f"tiny{len(rows)}" / "m.gguf", tokenizer, float_type="F32",
                                 tokenizer_pre="smollm")
        ids = torch.randint(0, config.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        cpp = LlamaCpp(path, n_tokens, threads)
        a, b = cpp.logits(ids), model(torch.tensor([ids])).logits[0].numpy()
        cpp.llm.close()
        rows[case] = {"mean_abs_diff": float(np.abs(a - b).mean()), "max_abs_diff": float(np.abs(a - b).max()),
                      "mean_abs_logit": float(np.abs(b).mean())}
        print(case, json.dumps(rows[case]), flush=True)
    return rows


def print_smollm_table(results: dict, args) -> None:
    print(f"\nllama_cpp {results['llama_cpp']}, ggml {results['ggml']}; {args.tokens} teacher-forced tokens per "
          f"text; greedy {args.steps} tokens from {PROMPT!r}\n")
    print("| file | ggml dequant = gguf-py | text | top-1 agree | mean abs dlogit | max abs dlogit | "
          "simulated ggml rounding alone: top-1, mean abs dlogit | ppl llama.cpp | ppl transformers | same tokens | "
          "greedy leading agree (transformers' margin at the split) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results["files"].items():
        dequant = ", ".join(f"{k} {v}" for k, v in row["ggml_dequantize_identical"].items()) or "-"
        margin = row["greedy"].get("transformers_margin_at_split")
        margin = f" ({margin:.3f})" if margin is not None else ""
        for text, t in row["texts"].items():
            print(f"| {name} | {dequant} | {text} | {t['top1_agree']:.1%} | {t['mean_abs_diff']:.4f} | "
                  f"{t['max_abs_diff']:.4f} | {t['rounding_alone_top1_agree']:.1%}, "
                  f"{t['rounding_alone_mean_abs_diff']:.4f} | {t['ppl_llamacpp']:.3f} | {t['ppl_transformers']:.3f} | "
                  f"{t['same_tokenization']} | {row['greedy']['agree_leading']}/{row['greedy']['steps']}{margin} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", nargs="+", default=["GPL-3", "Apache-2.0"], help="file names in " + str(LICENSES))
    p.add_argument("--tokens", type=int, default=512, help="teacher-forced tokens per text")
    p.add_argument("--steps", type=int, default=32, help="greedy tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", nargs="+", choices=("smollm", "tiny"), default=["smollm", "tiny"])
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
    lib = ggml_library()
    results = {"llama_cpp": llama_cpp.__version__, "ggml": f"{lib.ggml_version().decode()} "
               f"({lib.ggml_commit().decode()})", "torch": torch.__version__, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if "smollm" in args.parts:
            for name, path in export_files(float_dir, tokenizer, Path(tmp)).items():
                start = time.time()
                results["files"][name] = row = compare(path, texts, prompt, strings, args, tokenizer)
                row["seconds"] = round(time.time() - start, 1)
                print(name, json.dumps(row), flush=True)
            print_smollm_table(results, args)
        if "tiny" in args.parts:
            results["tiny"] = tiny_architecture_checks(tokenizer, Path(tmp), args.threads)
            print("\n| tiny llama, float32 export | mean abs dlogit | max abs dlogit | mean abs logit |")
            print("|---|---|---|---|")
            for case, r in results["tiny"].items():
                print(f"| {case} | {r['mean_abs_diff']:.5f} | {r['max_abs_diff']:.5f} | {r['mean_abs_logit']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
