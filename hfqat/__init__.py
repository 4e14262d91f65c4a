"""hfqat: quantization-aware training of LLMs as a first-class part of the Hugging Face stack.

Flow: `QATConfig` → transformers swaps linear layers for fake-quantized ones (`hf_quantizer`, `modeling`,
`layers`, `primitives`) → `QATCallback` drives training (distillation, sensitivity, re-allocation) →
`save_packed` packs real low-bit weights → `push_to_hub` publishes them.

`import hfqat` registers quant_method "hfqat" with transformers (and hfqat's LoRA layer with peft); a saved
hfqat checkpoint only loads as such after this import (otherwise transformers warns "Unknown quantization
type" and loads plain float layers, dropping the quantization).
"""

from ._version import __version__
from .callback import QATCallback
from .config import QATConfig
from .export import export_compressed_tensors, save_packed
from .hf_quantizer import register as _register
from .hub import HubUploadError, push_to_hub, write_model_card
from .lora import apply_lora
from .modeling import average_bits, bit_allocation, quantize_model, set_soft_sharpness

_register()

__all__ = [
    "HubUploadError",
    "QATCallback",
    "QATConfig",
    "__version__",
    "apply_lora",
    "average_bits",
    "bit_allocation",
    "export_compressed_tensors",
    "push_to_hub",
    "quantize_model",
    "save_packed",
    "set_soft_sharpness",
    "write_model_card",
]
