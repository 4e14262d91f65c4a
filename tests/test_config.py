"""QATConfig validation and serialization contracts."""

import pytest

from hfqat import QATConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(bits=9), "bits"),
        (dict(bits=1), "bits"),
        (dict(bits=4.0), "bits"),
        (dict(bits=True), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=-2), "group_size"),
        (dict(symmetric="yes"), "symmetric"),
        (dict(learn_scales=1), "learn_scales"),
        (dict(rounding="x"), "rounding"),
        (dict(clamping="tanh"), "clamping"),
        (dict(activation_bits=4), "activation_bits"),
        (dict(scale_init="percentile"), "scale_init"),
        (dict(ragged_groups="pad"), "ragged_groups"),
        (dict(modules_to_not_convert="lm_head"), "modules_to_not_convert"),
        (dict(layer_bits={"q_proj": 12}), "layer_bits"),
        (dict(layer_bits=[("q_proj", 4)]), "layer_bits"),
        (dict(layer_bits={"(": 4}), "layer_bits"),
        (dict(checkpoint_format="gguf"), "checkpoint_format"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QATConfig\.{field}"):
        QATConfig(**kwargs)


def test_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"allowed values: \['ste', 'soft'\]"):
        QATConfig(rounding="x")
    with pytest.raises(ValueError, match=r"2\.\.8"):
        QATConfig(bits=9)


def test_layer_bits_resolution():
    cfg = QATConfig(bits=4, layer_bits={"down_proj": 8, r"model\.layers\.0\..*": 2})
    assert cfg.bits_for("model.layers.3.mlp.down_proj") == 8  # plain name matches as suffix
    assert cfg.bits_for("model.layers.0.self_attn.q_proj") == 2  # regex full match
    assert cfg.bits_for("model.layers.1.self_attn.q_proj") == 4
    assert cfg.bits_for("model.layers.10.self_attn.q_proj") == 4  # regex must match fully


def test_group_size_resolution():
    assert QATConfig(group_size=-1).group_size_for("l", 576) == 576
    assert QATConfig(group_size=64).group_size_for("l", 576) == 64
    with pytest.raises(ValueError, match=r"does not divide in_features=576 of layer 'model.layers.0.q'"):
        QATConfig(group_size=128).group_size_for("model.layers.0.q", 576)
    assert QATConfig(group_size=128, ragged_groups="shrink").group_size_for("l", 576) == 64
    assert QATConfig(group_size=128, ragged_groups="per_channel").group_size_for("l", 576) == 576


def test_dict_round_trip_and_unknown_keys_warn():
    cfg = QATConfig(bits=3, group_size=32, symmetric=False, layer_bits={"q_proj": 8})
    d = cfg.to_dict()
    assert d["quant_method"] == "hfqat" and "hfqat_version" in d
    assert QATConfig.from_dict(d) == cfg
    with pytest.warns(UserWarning, match="future_option"):
        again = QATConfig.from_dict({**d, "future_option": 1})
    assert again == cfg
