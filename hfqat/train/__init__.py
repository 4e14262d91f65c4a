"""Stage 2, training: distillation, sensitivity, calibration, bit allocation, grid updates, `QATCallback`, plots.
Owns what changes a fake-quantized model during training; each part works without a Trainer.
May import: `hfqat.config`, `hfqat.distributed`, `hfqat.quant`. Never export, hub, integrations or cli."""
