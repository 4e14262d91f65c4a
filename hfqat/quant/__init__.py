"""Stage 1, fake quantization: integer and codebook grids, the fake-quantized layers, model surgery and RTN/GPTQ.
Owns everything a quantized weight *is* while it trains (numerics, Triton fake-quant kernels, layer state).
May import: `hfqat.config`, `hfqat.distributed`. Never a later stage (train, export, hub, integrations, cli)."""
