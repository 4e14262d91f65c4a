"""Glue to transformers: the `HfQuantizer` for quant_method "hfqat" and its registration.

Decides policy only (what is converted, trainable, serializable); surgery is in `hfqat.quant.modeling`.
"""

from __future__ import annotations

import logging

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..config import QUANT_METHOD, QATConfig
from ..quant.finite import check_finite_weights
from ..quant.experts import qat_experts, restore_float
from ..quant.modeling import (
    fit_belongs_on_accelerator,
    init_quant_params,
    qat_layers,
    replace_with_qat_layers,
)
from ..quant.selection import skip_list
from .load_checks import check_checkpoint_files, check_packed_finite

logger = logging.getLogger(__name__)

# Quant params a plain checkpoint does not have; they are fitted after loading, so no "missing keys" noise.
QUANT_PARAM_PATTERNS = (r"\.weight_scale$", r"\.weight_zero_point$", r"\.weight_bits$", r"\.weight_codebook$",
                        r"\.weight_row_bits$", r"\.routed_tokens$")


class QATHfQuantizer(HfQuantizer):
    """Converts linear layers to fake-quantized layers (or packed layers for packed checkpoints)."""

    requires_calibration = False
    quantization_config: QATConfig

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, checkpoint_files=None,
                                             **kwargs):
        config = self.quantization_config
        check_checkpoint_files(checkpoint_files)  # a damaged file is named before transformers reads it
        # the user's list adds to the defaults (head, tied embeddings); layer_bits naming the head converts it
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, skip_list(self.get_modules_to_not_convert(model), config.modules_to_not_convert, config.layer_bits),
            keep_in_fp32_modules or model._keep_in_fp32_modules
        )
        if config.checkpoint_format == "packed":
            from ..export.packed import expert_guard_keys, guard_keys_pattern, replace_with_packed_layers

            replaced = replace_with_packed_layers(model, config)
            experts = [k for n, e in config.packed_layers.items() for k in expert_guard_keys(n, e)]
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
                guard_keys_pattern(replaced, experts)}
            return model
        replace_with_qat_layers(model, config, self.modules_to_not_convert)
        if not self.pre_quantized:
            model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | set(
                QUANT_PARAM_PATTERNS
            )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.quantization_config.checkpoint_format == "packed":
            check_packed_finite(model)
        if self.quantization_config.checkpoint_format == "fake_quant":
            # NaN / inf weights (a float checkpoint gone bad, or a corrupted fake-quant one) are named here
            check_finite_weights(model, self.quantization_config, quant_params=self.pre_quantized)
        if self.quantization_config.checkpoint_format == "fake_quant" and not self.pre_quantized:
            # A float checkpoint: quant params were materialised uninitialised; fit them to the loaded weights (on
            # the GPU the model moves to next, when it was loaded on the CPU of a machine with one).
            init_quant_params(model, defer=fit_belongs_on_accelerator(model))
        return model

    def _dequantize(self, model, dtype=None):
        """Plain float layers holding exactly the quantized weights (fake-quant or packed)."""
        from ..export.packed import PackedRowsLinear, packed_modules
        from ..export.packed_experts import packed_experts, restore_float_packed

        def replace(layers) -> None:
            for name, layer in list(layers):
                float_layer = layer.to_float()
                model.set_submodule(name, float_layer if dtype is None else float_layer.to(dtype))

        replace(qat_layers(model))
        for _, experts in list(qat_experts(model)):
            restore_float(experts, dtype)
        # a per-row packed layer as a whole, before its parts would be found as packed layers of their own
        replace((name, m) for name, m in model.named_modules() if isinstance(m, PackedRowsLinear))
        for _, experts in packed_experts(model):  # likewise packed experts, before their per-expert matrices
            restore_float_packed(experts, dtype)
        replace(packed_modules(model))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return self.quantization_config.checkpoint_format == "fake_quant"

    @property
    def is_qat_trainable(self) -> bool:
        return self.quantization_config.checkpoint_format == "fake_quant"

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register "hfqat" with transformers' quantizer registry; safe to call any number of times.

    On a module reload the new classes replace the old ones instead of raising "already registered".
    """
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QATHfQuantizer
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QATConfig
        return
    register_quantization_config(QUANT_METHOD)(QATConfig)
    register_quantizer(QUANT_METHOD)(QATHfQuantizer)
