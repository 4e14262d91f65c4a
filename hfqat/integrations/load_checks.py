"""What is checked when transformers loads a checkpoint through hfqat's quantizer, so damage is named, not inherited.

- every safetensors file's header and size (a truncated, emptied or overwritten file): a `ValueError` naming the
  file, before any weight is read (safetensors' own error names no file);
- packed layers' scales, codebooks and biases are finite (`check_packed_finite`); fake-quantized layers' weights
  (and, for saved fake-quant checkpoints, scales) via `hfqat.quant.finite.check_finite_weights`.

Bit flips inside tensor data that leave values finite are not detected (safetensors stores no checksums).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from safetensors import SafetensorError, safe_open
from torch import nn

from ..export.packed import packed_modules
from ..quant.finite import describe_counts, non_finite_layers

PACKED_TENSORS = ("scales", "codebook", "bias")


def check_checkpoint_files(files: Iterable[str | os.PathLike] | None) -> None:
    """Open every safetensors file's header (cheap: nothing but the header is read); raise naming a damaged one."""
    for path in files or ():
        if not str(path).endswith(".safetensors"):
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"checkpoint file {str(path)!r} is damaged (truncated, emptied or overwritten: {err}); "
                             "restore it from its source or export the model again") from None


def check_packed_finite(model: nn.Module) -> None:
    """Raise naming every packed layer whose loaded scales, codebook or bias hold NaN or inf."""
    bad = non_finite_layers(packed_modules(model), PACKED_TENSORS)
    if bad:
        listing = "; ".join(f"{name}: {describe_counts(*counts)}" for name, counts in bad.items())
        raise ValueError(f"packed checkpoint holds non-finite values ({listing}); the file is damaged or was "
                         "written from a diverged model")
