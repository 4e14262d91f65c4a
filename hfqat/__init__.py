"""hfqat: quantization-aware training of LLMs as a first-class part of the Hugging Face stack.

The package is laid out by pipeline stage; each stage hands its results to the next and imports only earlier ones:
`config` (+ `distributed`) → `quant/` (fake-quant layers) → `train/` (`QATCallback`: distillation, sensitivity,
allocation) → `export/` (`save_packed`, compressed-tensors, GGUF) → `hub/` (`push_to_hub`) → `integrations/`
(transformers quantizer, peft, trl) → `cli/`.

`import hfqat` registers quant_method "hfqat" with transformers (and hfqat's LoRA layer with peft); a saved
hfqat checkpoint only loads as such after this import (a packed one loaded without it stops with a size mismatch
on its guard tensors instead of coming up with random weights).
"""

from ._version import __version__
from .config import QATConfig
from .export.compressed_tensors import export_compressed_tensors
from .export.gguf import export_gguf
from .export.packed import save_packed
from .hub.card import write_model_card
from .hub.push import HubUploadError, push_to_hub
from .integrations.peft import apply_lora
from .integrations.transformers import register as _register
from .quant.coverage import coverage
from .quant.modeling import (
    average_bits,
    bit_allocation,
    quantize_model,
    set_soft_sharpness,
)
from .train.callback import QATCallback

_register()

__all__ = [
    "HubUploadError",
    "QATCallback",
    "QATConfig",
    "__version__",
    "apply_lora",
    "average_bits",
    "bit_allocation",
    "coverage",
    "export_compressed_tensors",
    "export_gguf",
    "push_to_hub",
    "quantize_model",
    "save_packed",
    "set_soft_sharpness",
    "write_model_card",
]
