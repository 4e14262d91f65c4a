"""Stage 3, export: bit packing, packed inference layers and their kernels, one module per file format.
Owns turning a trained fake-quant model into real low-bit weights (`save_packed`, compressed-tensors).
May import: `hfqat.config`, `hfqat.distributed`, `hfqat.quant`. Never train, hub, integrations or cli."""
