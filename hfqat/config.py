"""`QATConfig`: the one description of how a model is fake-quantized during training and packed at export.

The same object drives layer surgery (`hfqat.quant.modeling`), training numerics (`hfqat.quant.primitives`) and
packing (`hfqat.export.packed`), so trained and exported numerics cannot drift apart. It is a transformers
`QuantizationConfigMixin`, saved in `config.json` under `quantization_config` and rebuilt on load.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ._version import __version__

QUANT_METHOD = "hfqat"
SUPPORTED_BITS = tuple(range(2, 9))
ROUNDING_MODES = ("ste", "soft")
CLAMPING_MODES = ("hard", "soft")
SCALE_INITS = ("mse", "minmax", "range")
RAGGED_GROUP_POLICIES = ("error", "shrink", "per_channel")
WEIGHT_FORMATS = ("int", "codebook", "fp8", "gguf")
CHECKPOINT_FORMATS = ("fake_quant", "packed")
BITS_GRANULARITIES = ("layer", "row")
ACTIVATION_BITS = (None, 8)
NON_FINITE_POLICIES = ("error", "skip")
# weight_format="gguf": llama.cpp type -> (nominal bits, weights per block); the grids are hfqat.quant.gguf_grids
GGUF_TYPES = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32), "Q8_0": (8, 32), "IQ4_NL": (4, 32),
              "Q2_K": (2, 256), "Q3_K": (3, 256), "Q4_K": (4, 256), "Q5_K": (5, 256), "Q6_K": (6, 256)}
# the type a nominal width maps to (4 bits: the layer's own 4-bit type when it has one)
GGUF_TYPE_FOR_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
# llama.cpp's substitutes (llama-quant.cpp) for rows that are not a multiple of 256
GGUF_LLAMA_CPP_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
GGUF_FALLBACKS = ("error", "llama.cpp")


def resolve_gguf_type(name: str, in_features: int, fallback: str = "error", layer: str = "") -> str:
    """The GGUF type a layer of ``in_features`` inputs uses for ``name``: itself, llama.cpp's substitute when
    ``fallback="llama.cpp"`` and the rows do not split into its blocks, else a ValueError naming the layer."""
    block = GGUF_TYPES[name][1]
    if in_features % block == 0:
        return name
    if fallback == "llama.cpp" and name in GGUF_LLAMA_CPP_FALLBACK and in_features % 32 == 0:
        return GGUF_LLAMA_CPP_FALLBACK[name]
    small = [n for n, (_, b) in GGUF_TYPES.items() if in_features % b == 0]
    raise ValueError(
        f"QATConfig.gguf_type={name!r} needs in_features divisible by its block size {block}; layer {layer!r} has "
        f"in_features={in_features}; allowed: a type whose blocks divide it ({small}), gguf_fallback='llama.cpp' "
        f"(llama.cpp's substitutes {GGUF_LLAMA_CPP_FALLBACK}), or list the layer in modules_to_not_convert")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"QATConfig.{name}={value!r} is invalid; allowed values: {list(allowed)}")


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_BITS:
        raise ValueError(
            f"QATConfig.{name}={value!r} is invalid; allowed values: integers "
            f"{SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}"
        )


@dataclass(frozen=True)
class LayerQuantSpec:
    """Resolved quantization settings of one layer (what the config means for that layer)."""

    bits: int
    group_size: int  # always a divisor of in_features (per-channel = in_features)
    symmetric: bool
    learn_scales: bool
    rounding: str
    clamping: str
    activation_bits: int | None
    scale_init: str
    weight_format: str = "int"  # "int" grid or "codebook" (hfqat.quant.codebook)
    codebook_max_bits: int = 8  # codebook layers: centroid slots allocated = 2**codebook_max_bits
    row_bits: bool = False  # one bit width per output row (``weight_row_bits``) instead of one per layer
    gguf_type: str | None = None  # weight_format="gguf": the layer's GGUF type (after any llama.cpp fallback)
    gguf_fallback: str = "error"

    @property
    def activation_format(self) -> str:
        """The dynamic per-token activation quantizer's number format: FP8 next to FP8 weights, else int8."""
        return "fp8" if self.weight_format == "fp8" else "int"


@dataclass
class QATConfig(QuantizationConfigMixin):
    """Quantization-aware training config, passed as `from_pretrained(..., quantization_config=QATConfig())`.

    Args:
        bits: default weight bits, 2..8.
        group_size: elements sharing one scale along in_features; -1 means one scale per output channel.
        symmetric: True for a signed grid without zero point; False adds a (learned) zero point.
        learn_scales: scales and zero points are trainable parameters (LSQ-style gradients).
        rounding: "ste" (round, straight-through gradient) or "soft" (annealed continuous round).
        clamping: "hard" or "soft" (annealed continuous clamp).
        activation_bits: None, or 8 for dynamic per-token symmetric fake quantization of linear inputs, exactly as
            vLLM's W8A8 kernels quantize them (int8; FP8 e4m3 with ``weight_format="fp8"``).
        modules_to_not_convert: module names (or name suffixes, or parent modules) kept in full precision, in
            addition to the default ones (the output head and tied embeddings); to quantize the head, name it in
            ``layer_bits`` (``{"lm_head": 8}``). An entry that matches no module warns with the closest names.
        layer_bits: {"module name or regex": bits}; the first full match wins, plain names also match as suffix. A key
            that selects no converted layer warns with the closest names.
        scale_init: "mse" (clip search minimising weight error), "minmax" (no weight clipped) or "range" (the
            group's range over 2^b - 1 levels, as torchao: symmetric scale max|w| / (qmax + 1/2); at a short
            budget it trained best, bench/results/cpu_s15_qat_real.md).
        ragged_groups: what to do when group_size does not divide a layer's in_features: "error" (default,
            names the layer), "shrink" (largest power-of-two divisor below group_size, with a warning) or
            "per_channel" (one scale per row for those layers, with a warning).
        weight_format: "int" (uniform integer grid), "fp8" (e4m3 weights, one scale per output channel, `hfqat.quant.fp8`;
            ``bits``/``group_size`` become 8/-1; with ``activation_bits=8`` dynamic per-token FP8 activations) or
            "codebook" (weight clustering, `hfqat.quant.codebook`: per output
            channel or group a learned codebook of 2^bits float centroids, k-means initialised; ``symmetric`` and
            ``scale_init`` do not apply; rounding/clamping must be "ste"/"hard").
        codebook_max_bits: codebook layers only: the largest bit width a layer may take (re-allocation
            included); every layer allocates 2^codebook_max_bits centroid slots up front so that bit changes keep
            parameter shapes. Memory: (out, in/group_size, 2^codebook_max_bits) fp32 per layer (at 8 bits and
            per-channel codebooks 256/in_features of the weight's size); lower it for group-wise codebooks.
        bits_granularity: "layer" (one bit width per layer) or "row" (one per output row: every layer holds a
            ``weight_row_bits`` buffer and `QATCallback` allocates bits row by row; int weights only). Rows
            recover much of what finer allocation units gain (bench/results/h200_s7_row_allocation.txt) in a
            format that packs as one plain matrix per width.
        checkpoint_format: "fake_quant" (float weights + quant params, trainable) or "packed" (written by
            `hfqat.save_packed`, real low-bit integers for inference).
        packed_layers: for packed checkpoints, {module name: {"bits", "group_size"}} of every packed layer.
        non_finite: what conversion does with a layer whose loaded weight holds NaN or inf: "error" (default; raises
            naming each such layer and its NaN / inf counts) or "skip" (keeps it in full precision, logged by name).
        gguf_type: weight_format="gguf" only: the llama.cpp type every layer trains on (default "Q4_K"; one of
            `GGUF_TYPES`); ``bits`` becomes the type's nominal width and ``layer_bits`` picks other types per layer
            (2→Q2_K, 3→Q3_K, 4→this type if 4-bit else Q4_K, 5→Q5_K, 6→Q6_K, 8→Q8_0). The fake quantizer is the
            GGUF block format itself (`hfqat.quant.gguf_grids`); `hfqat.export_gguf` writes its blocks losslessly.
        gguf_fallback: layers whose in_features is not a multiple of the type's block size (256 for K-quants):
            "error" (default, names the layer) or "llama.cpp" (llama.cpp's substitutes: Q4_K→Q5_0, Q5_K→Q5_1,
            Q6_K→Q8_0, Q2_K/Q3_K→IQ4_NL).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    learn_scales: bool = True
    rounding: str = "ste"
    clamping: str = "hard"
    activation_bits: int | None = None
    modules_to_not_convert: list[str] | None = None
    layer_bits: dict[str, int] | None = None
    scale_init: str = "mse"
    ragged_groups: str = "error"
    weight_format: str = "int"
    codebook_max_bits: int = 8
    bits_granularity: str = "layer"
    checkpoint_format: str = "fake_quant"
    packed_layers: dict[str, dict[str, int]] | None = None
    non_finite: str = "error"
    gguf_type: str | None = None
    gguf_fallback: str = "error"
    quant_method: str = field(default=QUANT_METHOD, repr=False)
    hfqat_version: str = field(default=__version__, repr=False)

    def __post_init__(self) -> None:
        self.quant_method = QUANT_METHOD
        _check_bits("bits", self.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != -1 and self.group_size < 1
        ):
            raise ValueError(
                f"QATConfig.group_size={self.group_size!r} is invalid; allowed values: -1 (per output channel) "
                "or a positive integer that divides every quantized layer's in_features"
            )
        for name in ("symmetric", "learn_scales"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QATConfig.{name}={getattr(self, name)!r} is invalid; allowed values: [True, False]")
        _check_choice("rounding", self.rounding, ROUNDING_MODES)
        _check_choice("clamping", self.clamping, CLAMPING_MODES)
        _check_choice("activation_bits", self.activation_bits, ACTIVATION_BITS)
        _check_choice("scale_init", self.scale_init, SCALE_INITS)
        _check_choice("ragged_groups", self.ragged_groups, RAGGED_GROUP_POLICIES)
        _check_choice("weight_format", self.weight_format, WEIGHT_FORMATS)
        _check_bits("codebook_max_bits", self.codebook_max_bits)
        _check_choice("bits_granularity", self.bits_granularity, BITS_GRANULARITIES)
        if self.bits_granularity == "row" and self.weight_format != "int":
            raise ValueError("QATConfig.bits_granularity='row' needs weight_format='int'; allowed with "
                             f"weight_format={self.weight_format!r}: ['layer']")
        _check_choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        if self.modules_to_not_convert is not None:
            if not isinstance(self.modules_to_not_convert, (list, tuple)) or not all(
                isinstance(m, str) for m in self.modules_to_not_convert
            ):
                raise ValueError(
                    f"QATConfig.modules_to_not_convert={self.modules_to_not_convert!r} is invalid; "
                    "allowed values: None or a list of module names"
                )
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if self.layer_bits is not None:
            if not isinstance(self.layer_bits, dict):
                raise ValueError(
                    f"QATConfig.layer_bits={self.layer_bits!r} is invalid; allowed values: None or "
                    "{'module name or regex': bits}"
                )
            for pattern, bits in self.layer_bits.items():
                if not isinstance(pattern, str):
                    raise ValueError(f"QATConfig.layer_bits key {pattern!r} is invalid; allowed values: module names "
                                     "or regexes (strings)")
                _check_bits(f"layer_bits[{pattern!r}]", bits)
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"QATConfig.layer_bits key {pattern!r} is not a valid regex: {err}") from None
        if self.weight_format == "codebook":
            self._check_codebook()
        _check_choice("non_finite", self.non_finite, NON_FINITE_POLICIES)
        if self.packed_layers is not None and not isinstance(self.packed_layers, dict):
            raise ValueError(f"QATConfig.packed_layers={self.packed_layers!r} is invalid; allowed values: None or "
                             "{module name: {'bits', 'group_size', ...}}")
        if self.weight_format == "fp8":
            self._check_fp8()
        if self.weight_format == "gguf" or self.gguf_type is not None:
            self._check_gguf()
        if self.checkpoint_format == "packed" and not self.packed_layers:
            raise ValueError("QATConfig.packed_layers must list the packed layers when checkpoint_format='packed'")

    def _check_codebook(self) -> None:
        for name in ("rounding", "clamping"):
            if getattr(self, name) == "soft":
                raise ValueError(f"QATConfig.{name}='soft' is not supported with weight_format='codebook' (nearest-"
                                 f"centroid assignment has no soft relaxation here); allowed values: "
                                 f"{['ste' if name == 'rounding' else 'hard']}")
        too_wide = {key: b for key, b in {"bits": self.bits, **(self.layer_bits or {})}.items()
                    if b > self.codebook_max_bits}
        if too_wide:
            raise ValueError(f"QATConfig.codebook_max_bits={self.codebook_max_bits} is below the bits of {too_wide}; "
                             f"allowed: codebook_max_bits >= every layer's bits")
        if not self.symmetric:
            warnings.warn("QATConfig.symmetric=False is ignored with weight_format='codebook' (codebooks have no zero "
                          "point)")

    def _check_fp8(self) -> None:
        # e4m3 with one scale per output channel is the whole format: bits and group_size take its values
        for name in ("rounding", "clamping"):
            if getattr(self, name) == "soft":
                raise ValueError(f"QATConfig.{name}='soft' is not supported with weight_format='fp8'; allowed "
                                 f"values: {['ste' if name == 'rounding' else 'hard']}")
        if not self.symmetric:
            raise ValueError("QATConfig.symmetric=False is invalid with weight_format='fp8'; allowed values: [True]")
        if self.layer_bits and any(b != 8 for b in self.layer_bits.values()):
            raise ValueError(f"QATConfig.layer_bits={self.layer_bits} is invalid with weight_format='fp8' (e4m3 "
                             "weights are 8-bit); allowed values: None")
        if self.bits_granularity != "layer":
            raise ValueError("QATConfig.bits_granularity must be 'layer' with weight_format='fp8'")
        self.bits, self.group_size = 8, -1

    def _check_gguf(self) -> None:
        if self.weight_format != "gguf":
            raise ValueError(f"QATConfig.gguf_type={self.gguf_type!r} needs weight_format='gguf'; allowed with "
                             f"weight_format={self.weight_format!r}: [None]")
        if self.gguf_type is None:
            self.gguf_type = "Q4_K"
        _check_choice("gguf_type", self.gguf_type, tuple(GGUF_TYPES))
        _check_choice("gguf_fallback", self.gguf_fallback, GGUF_FALLBACKS)
        for name in ("rounding", "clamping"):
            if getattr(self, name) == "soft":
                raise ValueError(f"QATConfig.{name}='soft' is not supported with weight_format='gguf'; allowed "
                                 f"values: {['ste' if name == 'rounding' else 'hard']}")
        for pattern, bits in (self.layer_bits or {}).items():
            if bits not in GGUF_TYPE_FOR_BITS:
                raise ValueError(f"QATConfig.layer_bits[{pattern!r}]={bits} has no GGUF type; allowed values: "
                                 f"{sorted(GGUF_TYPE_FOR_BITS)} ({GGUF_TYPE_FOR_BITS})")
        self.bits = GGUF_TYPES[self.gguf_type][0]

    # -- per-layer resolution ------------------------------------------------------------------------------
    def bits_for(self, module_name: str) -> int:
        """Weight bits of `module_name`: the first matching `layer_bits` entry, else `bits`."""
        for pattern, bits in (self.layer_bits or {}).items():
            if module_name == pattern or module_name.endswith("." + pattern) or re.fullmatch(pattern, module_name):
                return bits
        return self.bits

    def group_size_for(self, module_name: str, in_features: int) -> int:
        """The group size actually used by a layer, always a divisor of in_features."""
        if self.group_size == -1 or self.group_size == in_features:
            return in_features
        if in_features % self.group_size == 0:
            return self.group_size
        if self.ragged_groups == "error":
            raise ValueError(
                f"QATConfig.group_size={self.group_size} does not divide in_features={in_features} of layer "
                f"{module_name!r}; allowed: a divisor of {in_features}, -1 (per channel), or set "
                f"ragged_groups='shrink' / 'per_channel', or list the layer in modules_to_not_convert"
            )
        if self.ragged_groups == "per_channel":
            return in_features
        size = 1 << (self.group_size.bit_length() - 1)
        while in_features % size:
            size //= 2
        return size

    def spec_for(self, module_name: str, in_features: int) -> LayerQuantSpec:
        if self.weight_format == "gguf":
            return self._gguf_spec_for(module_name, in_features)
        return LayerQuantSpec(
            bits=self.bits_for(module_name),
            group_size=self.group_size_for(module_name, in_features),
            symmetric=self.symmetric,
            learn_scales=self.learn_scales,
            rounding=self.rounding,
            clamping=self.clamping,
            activation_bits=self.activation_bits,
            scale_init=self.scale_init,
            weight_format=self.weight_format,
            codebook_max_bits=self.codebook_max_bits,
            row_bits=self.bits_granularity == "row",
        )

    def _gguf_spec_for(self, module_name: str, in_features: int) -> LayerQuantSpec:
        """GGUF layers: the type from gguf_type / layer_bits, checked against in_features (ValueError naming the
        layer); the scale slots are per 16 weights (`hfqat.quant.gguf_grids.SLOT`)."""
        bits = self.bits_for(module_name)
        name = self.gguf_type if bits == self.bits else GGUF_TYPE_FOR_BITS[bits]
        name = resolve_gguf_type(name, in_features, self.gguf_fallback, module_name)
        return LayerQuantSpec(bits=GGUF_TYPES[name][0], group_size=16, symmetric=False,
                              learn_scales=self.learn_scales, rounding="ste", clamping="hard",
                              activation_bits=self.activation_bits, scale_init="mse", weight_format="gguf",
                              gguf_type=name, gguf_fallback=self.gguf_fallback)

    # -- serialization --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Rebuild from a saved dict, dropping (with a warning) keys that this hfqat version does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            warnings.warn(f"QATConfig: ignoring unknown saved keys {unknown} (saved by another hfqat version?)")
        return super().from_dict(
            {k: v for k, v in config_dict.items() if k in known}, return_unused_kwargs=return_unused_kwargs, **kwargs
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
