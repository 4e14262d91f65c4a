"""Stage 4, publishing: the generated model card (template, bit map, metrics, plots) and the Hub upload.
Owns what a user sees on the Hub; reads export folders and the training history files.
May import: `hfqat.config`, `hfqat.quant`, `hfqat.train` (plots), `hfqat.export.packed`. Never integrations or cli."""
