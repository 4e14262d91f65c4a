"""The MoE architectures of the installed transformers, read from its model registry, and tiny random configs of them.

`moe_model_types()` lists every registered model type whose modeling module defines an experts class (a class named
``*Expert*`` holding parameters); `tiny_moe_config(model_type)` shrinks the type's default config (a few experts,
hidden size 64, two layers). Tests parametrize over these, so a model type a future transformers adds shows up as
tested or as uncovered (tests/test_moe.py), never as silently float.
"""

from __future__ import annotations

import functools
import importlib
import inspect

from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HIDDEN, EXPERTS, TOP_K, VOCAB = 64, 4, 2, 256
# config attribute -> tiny value (set only where the default config has the attribute)
TINY_VALUES = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "d_model": HIDDEN, "intermediate_size": 64, "ffn_hidden_size": 32,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layers": 2, "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_top_k": TOP_K, "top_k": TOP_K,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "max_position_embeddings": 128,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "decoder_sparse_step": 1, "sliding_window": 64, "n_shared_experts": 1, "num_shared_experts": 1,
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "moe_layer_freq": 1, "num_experts_per_token": TOP_K, "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32, "mamba_num_heads": 8, "mamba_head_dim": 16, "mamba_n_heads": 8, "mamba_d_head": 16,
    "n_groups": 1, "mamba_n_groups": 1, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1,
    "expert_layer_offset": 0, "num_dense_layers": 1, "moe_topk": TOP_K,
}
# types whose sizes sit in nested sub-configs
SPECIAL_CONFIGS = {
    "dbrx": dict(d_model=HIDDEN, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=128, tie_word_embeddings=False,
                 attn_config={"kv_n_heads": 2}, ffn_config={"ffn_hidden_size": 32, "moe_num_experts": EXPERTS,
                                                            "moe_top_k": TOP_K}),
}
# per-layer type lists: keep one layer of each kind (the model gets as many layers as kinds)
LAYER_PATTERN_KEYS = ("layer_types", "layers_block_type", "mlp_layer_types")


def modeling_module(model_type: str):
    name = model_type_to_module_name(model_type)
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except Exception:  # an optional dependency missing, or no modeling file under that name
        return None


@functools.cache
def moe_model_types() -> tuple[str, ...]:
    """Causal-LM model types whose modeling module defines an experts class with parameters of its own."""
    found = []
    for model_type in sorted(CONFIG_MAPPING.keys()):
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            continue
        module = modeling_module(model_type)
        if module is None:
            continue
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if issubclass(c, nn.Module) and "expert" in c.__name__.lower() and c.__module__ == module.__name__
                   and "nn.Parameter" in inspect.getsource(c)]
        if classes:
            found.append(model_type)
    return tuple(found)


def tiny_moe_config(model_type: str):
    """The type's default config with the sizes of `TINY_VALUES` (and per-layer lists cut to two layers)."""
    if model_type in SPECIAL_CONFIGS:
        return CONFIG_MAPPING[model_type](**SPECIAL_CONFIGS[model_type])
    config = CONFIG_MAPPING[model_type]()
    text = getattr(config, "text_config", None) or config
    for cfg in {id(config): config, id(text): text}.values():
        for key, value in TINY_VALUES.items():
            if hasattr(cfg, key) and isinstance(getattr(cfg, key), int) and not isinstance(getattr(cfg, key), bool):
                setattr(cfg, key, value)
        for key, value in list(vars(cfg).items()):
            if key.endswith(LAYER_PATTERN_KEYS) and isinstance(value, list) and len(value) > 2:
                kinds = list(dict.fromkeys(value))
                setattr(cfg, key, kinds if len(kinds) > 1 else value[:2])
                cfg.num_hidden_layers = len(getattr(cfg, key))
        for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= VOCAB:
                setattr(cfg, key, value)
        if getattr(cfg, "qk_rope_head_dim", None) and hasattr(cfg, "head_dim"):
            cfg.head_dim = cfg.qk_rope_head_dim  # multi-head latent attention: rotary dims are the "head_dim"
        if isinstance(getattr(cfg, "mlp_only_layers", None), list):
            cfg.mlp_only_layers = [0]  # layer 0 dense, layer 1 MoE
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return config
