"""Stage 5, integrations: transformers' quantizer registry, peft (LoRA inside the quantizer), trl, GGUF input.
Owns the glue by which other libraries drive hfqat's stages; no numerics of its own.
May import: every stage before it (config, quant, train, export, hub). Never cli."""
