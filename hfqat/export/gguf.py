"""`export_gguf`: a model trained on GGUF grids (``QATConfig(weight_format="gguf")``) as a llama.cpp GGUF file.

Every fake-quantized layer is written as the raw blocks of its trained type (`hfqat.quant.gguf_grids.pack_blocks`
of the layer's own codes: lossless, the file dequantizes to exactly the fake-quant weights); every other tensor as
F16 (matrices) or F32 (vectors), as llama.cpp's converter does. What is reused rather than written here: tensor names
(`gguf.get_tensor_name_map`), the architecture keys (transformers' `GGUF_CONFIG_MAPPING`, inverted), the vocabulary,
merges and special tokens (`gguf.vocab`), the writer (`gguf.GGUFWriter`). What is written here, as llama.cpp's
converter (convert_hf_to_gguf.py) does: the q/k row permutation for llama/mistral, biases included (its
``LlamaModel.permute``, undone by transformers' loader), the head size (``attention.key_length``), linear rope scaling
and llama3's ``rope_freqs`` factors (other rope scalings are refused), the added tokens' types (CONTROL when special)
and the choice of types.

Layers trained on another format are refused, naming the layer and the ``gguf_type`` to train with; with
``allow_requantize=True`` they are re-quantized (round-to-nearest on that type, from their fake-quant weights) with a
warning, since that discards the grid they were trained on.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from ..config import GGUF_TYPE_FOR_BITS, resolve_gguf_type
from ..quant.gguf_grids import GGUF_GRIDS, GGUFGrid, fit_grid, gguf_codes, pack_blocks
from ..quant.gguf_layers import GGUFMixin
from ..quant.modeling import qat_layers
from .checkpoint import _check_plain_model

# transformers model_type -> gguf architecture; the llama family stores q/k rows permuted (rotary pairs interleaved)
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
PERMUTED_QK = ("llama", "mistral")
FLOAT_TYPES = ("F16", "F32")
ROPE_TYPES = ("default", "linear", "llama3")  # what the file can say for llama.cpp's llama/qwen2 architectures


def _permute(rows: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` on the row axis (rows are independent: it applies to packed blocks too)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _layer_blocks(name: str, layer, allow_requantize: bool, lost: list[str]) -> tuple[np.ndarray, GGUFGrid]:
    """(out, bytes) uint8 blocks of a fake-quantized layer, and its type."""
    if isinstance(layer, GGUFMixin):
        return pack_blocks(layer.gguf_codes(), layer.grid), layer.grid
    fmt, bits = layer.spec.weight_format, layer.bits
    suggestion = GGUF_TYPE_FOR_BITS.get(bits, "Q8_0")
    if not allow_requantize:
        raise ValueError(
            f"export_gguf: layer {name!r} was trained with weight_format={fmt!r} bits={bits}, not on a GGUF grid; "
            f"train with QATConfig(weight_format='gguf', gguf_type={suggestion!r}) (a lossless export), or pass "
            "allow_requantize=True to re-quantize it (what QAT learned for its own grid is lost)")
    grid = GGUF_GRIDS[resolve_gguf_type(suggestion, layer.in_features, "llama.cpp", name)]
    w = layer.quantized_weight(exact=True).detach().float()
    scale, zero = fit_grid(w, grid)
    lost.append(f"{name} ({fmt} {bits}-bit -> {grid.name})")
    return pack_blocks(gguf_codes(w, scale, zero, grid), grid), grid


def _rope_parameters(config) -> dict:
    """The rope settings (transformers 5: ``rope_parameters``, with the theta; before: ``rope_scaling``), with
    ``rope_type`` always set."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_architecture(writer, arch: str, config) -> None:
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    rope = _rope_parameters(config)
    for key, attribute in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(config, attribute, None) if attribute else None
        if key == "rope.dimension_count" and value is None:
            value = _head_dim(config)
        if key == "rope.freq_base" and value is None:  # transformers 5 keeps it in rope_parameters
            value = rope.get("rope_theta")
        if value is None:
            continue
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", int(value))
    # llama.cpp takes the head size from these (else hidden_size / heads, wrong when a config sets head_dim)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _rope_freqs(config) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for llama3 rope scaling (its converter's factors: it divides each rotary
    frequency by one); None for unscaled rope. Scalings llama.cpp's llama architecture would get wrong are refused."""
    rope = _rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"export_gguf: rope_type={rope['rope_type']!r} is not supported; allowed values: "
                         f"{list(ROPE_TYPES)}")
    if rope["rope_type"] != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    wavelen = 2 * np.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, mid))
    return out.astype(np.float32)


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    """Vocabulary, merges, special tokens and chat template through gguf-py's readers of a saved tokenizer."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab, model = BpeVocab(Path(tmp)), "gpt2"
        except (FileNotFoundError, TypeError, KeyError):
            vocab, model = LlamaHfVocab(Path(tmp)), "llama"
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        if model == "gpt2":  # gguf-py types added tokens inside the vocabulary NORMAL; llama.cpp's converter does not
            for i, added in tokenizer.added_tokens_decoder.items():
                if i < len(types):
                    types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        for i in range(len(tokens), vocab_size):  # as llama.cpp's converter: pad to the embedding's rows
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = SpecialVocab(Path(tmp), load_merges=model == "gpt2", n_vocab=len(tokens))
        if "bos" not in special.add_special_token and isinstance(getattr(tokenizer, "add_bos_token", None), bool):
            special.add_special_token["bos"] = tokenizer.add_bos_token  # else llama.cpp guesses from the vocab type
        special.add_to_gguf(writer, quiet=True)


def _file_type(types: Counter):
    import gguf

    name = types.most_common(1)[0][0]
    for candidate in (f"MOSTLY_{name}", f"MOSTLY_{name}_M"):
        if candidate in gguf.LlamaFileType.__members__:
            return gguf.LlamaFileType[candidate]
    return None


@torch.no_grad()
def export_gguf(model: nn.Module, path: str | os.PathLike, tokenizer=None, allow_requantize: bool = False,
                float_type: str = "F16", tokenizer_pre: str | None = None) -> Path:
    """Write ``model`` as a GGUF file at ``path`` (atomically: a temporary file in the same folder, fsync, rename).

    Args:
        model: a transformers causal LM (llama, mistral or qwen2 architecture) loaded with
            ``QATConfig(weight_format="gguf")``.
        path: the ``.gguf`` file to write.
        tokenizer: its tokenizer (vocabulary, merges, special tokens, chat template go into the file); llama.cpp
            needs one, transformers' model loader does not.
        allow_requantize: re-quantize layers trained on another format (with a warning) instead of refusing.
        float_type: "F16" (llama.cpp's default) or "F32" for the tensors that are not quantized (matrices; vectors
            are always F32).
        tokenizer_pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``, e.g. "smollm"; llama.cpp's
            converter finds it from a hash of the tokenizer's output); default "default".
    Returns:
        The path written.
    """
    import gguf

    _check_plain_model(model)
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"export_gguf: float_type={float_type!r} is invalid; allowed values: {list(FLOAT_TYPES)}")
    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ValueError(f"export_gguf: model_type={config.model_type!r} is not supported; allowed: "
                         f"{sorted(ARCHITECTURES)}")
    path = Path(path)
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    quantized = dict(qat_layers(model))
    lost: list[str] = []
    types: Counter = Counter()
    tensors: list[tuple[str, np.ndarray, object]] = []  # (gguf name, data, raw dtype or None)
    if (rope_freqs := _rope_freqs(config)) is not None:
        tensors.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs, None))

    def gguf_name(hf_name: str) -> str:
        base, suffix = hf_name.rsplit(".", 1)
        mapped = names.get_name(base)
        if mapped is None:
            raise ValueError(f"export_gguf: no GGUF tensor name for {hf_name!r} ({arch})")
        return f"{mapped}.{suffix}"

    def rows_in_file_order(name: str, rows: np.ndarray) -> np.ndarray:
        if arch in PERMUTED_QK and name.endswith(("attn_q.weight", "attn_q.bias")):
            return _permute(rows, config.num_attention_heads)
        if arch in PERMUTED_QK and name.endswith(("attn_k.weight", "attn_k.bias")):
            return _permute(rows, config.num_attention_heads, config.num_key_value_heads)
        return rows

    for layer_name, layer in quantized.items():
        blocks, grid = _layer_blocks(layer_name, layer, allow_requantize, lost)
        name = gguf_name(f"{layer_name}.weight")
        tensors.append((name, rows_in_file_order(name, blocks), grid.qtype))
        types[grid.name] += layer.weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.rsplit(".", 1)[0] in quantized and not hf_name.endswith(".bias"):
            continue  # written above as blocks (quantizer state included)
        if tied and hf_name == "lm_head.weight":
            continue  # transformers and llama.cpp both re-tie the output to the embedding
        name = gguf_name(hf_name)
        data = tensor.detach().float().cpu().numpy()
        if data.ndim >= 2 and float_type == "F16":
            data = data.astype(np.float16)
        tensors.append((name, rows_in_file_order(name, data), None))
    if lost:
        warnings.warn("export_gguf: re-quantized layers trained on another format (allow_requantize=True); their "
                      "trained grids are lost, the file holds round-to-nearest GGUF blocks of their fake-quant "
                      f"weights: {'; '.join(lost)}", stacklevel=2)

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        # the checkpoint's folder / hub name, not its local path (llama.cpp prints it; the path is this machine's)
        writer.add_name(Path(getattr(config, "_name_or_path", "") or "hfqat-model").name)
        _add_architecture(writer, arch, config)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if types and (file_type := _file_type(types)) is not None:
            writer.add_file_type(file_type)
        if tokenizer is not None:
            _add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
        for name, data, raw_dtype in tensors:
            writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
