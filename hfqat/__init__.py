"""hfqat: quantization-aware training of LLMs as a first-class part of the Hugging Face stack.

Flow: `QATConfig` → transformers swaps linear layers for fake-quantized ones (`hf_quantizer`, `modeling`,
`layers`, `primitives`) → `QATCallback` drives training (distillation, sensitivity, re-allocation) →
`save_packed` packs real low-bit weights → `push_to_hub` publishes them.

`import hfqat` registers quant_method "hfqat" with transformers; a saved hfqat checkpoint only loads as
such after this import (otherwise transformers loads plain float layers and warns about unexpected keys).
"""

from ._version import __version__
from .config import QATConfig
from .hf_quantizer import register as _register
from .modeling import average_bits, bit_allocation, quantize_model, set_soft_sharpness

_register()

__all__ = [
    "QATConfig",
    "__version__",
    "average_bits",
    "bit_allocation",
    "quantize_model",
    "set_soft_sharpness",
]
