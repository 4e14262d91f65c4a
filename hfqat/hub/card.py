"""Publishing: pack a QAT model, write its model card, upload the folder to the Hub (or any `HF_ENDPOINT`).

Three steps, each usable alone:

- `write_model_card(model, out_dir, ...)` renders `README.md` from `hfqat/hub/templates/model_card.md` with
  `huggingface_hub.ModelCard.from_template` (YAML metadata + how to load + bit map + plots + metrics + settings).
- `push_packed_dir(local_dir, repo_id, ...)` uploads an existing packed export (what `hfqat push` calls).
- `push_to_hub(model, repo_id, ...)` does all of it: `save_packed` -> card -> `create_repo` + `upload_folder`.

Failures of the endpoint raise `HubUploadError` carrying the HTTP status and the local export path, which is
left intact so the upload can simply be retried. The token is never logged, written to the card or put in
an error message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .._version import __version__
from ..quant.coverage import coverage
from ..quant.experts import qat_experts
from ..quant.modeling import qat_layers
from .bitmap import BIT_MAP_NAME, plot_bit_map

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"  # package data (in the wheel)
PLOTS_DIR = "plots"
# Weight files an earlier push may have left that a new export replaces (e.g. a different shard count).
STALE_WEIGHT_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
# TrainingArguments fields worth showing on a card (the full dump is long and partly machine-specific).
TRAINING_ARG_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "warmup_steps", "warmup_ratio", "lr_scheduler_type", "weight_decay",
    "optim", "bf16", "fp16", "seed",
)
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_model_card(
    model: nn.Module | None,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    plots: Sequence[str | os.PathLike] | None = None,
    training_args: Any = None,
    reproduce_command: str | Sequence[str] | None = None,
    base_model: str | None = None,
    has_tokenizer: bool | None = None,
    template_path: str | os.PathLike | None = None,
    redact: Sequence[str] = (),
) -> Path:
    """Render the hfqat model card to `out_dir/README.md` and copy `plots` to `out_dir/plots/`; returns the path.

    Args:
        model: the QAT (or packed) model; its layers give the bit map and weight counts. None reads the bit
            map from `out_dir/config.json` (an existing `save_packed` export).
        out_dir: folder to write into (usually the packed export).
        repo_id: Hub id used in the loading snippet and title; default: a local-path placeholder.
        metrics: {"FP": {"ppl": 12.1}, "PTQ": {...}, "QAT": {...}}: one table row per model, one column per metric.
        plots: PNG files (e.g. the callback's `bit_allocation.png`), embedded with relative links.
        training_args: training and distillation settings: a mapping, a dataclass such as `QATCallback`,
            `transformers.TrainingArguments` (curated subset shown), or a list of these; keys containing
            "token" are never written.
        reproduce_command: the command that reproduces this model (string or argv list).
        base_model: Hub id of the float model; default: the model's `name_or_path` when it looks like a Hub id.
        has_tokenizer: whether the loading snippet shows the tokenizer; default: a tokenizer file is in out_dir.
        template_path: Jinja template; default `hfqat/hub/templates/model_card.md`.
        redact: strings (tokens) scrubbed from the rendered card, as a last line of defence.
    """
    from huggingface_hub import ModelCard, ModelCardData

    out_dir = Path(out_dir)
    plot_paths = _check_plots(plots)
    columns, metric_rows = _metrics_table(metrics)
    export_config = _read_export_config(out_dir)
    layers = _layer_rows(model, export_config) or _ct_layer_rows(out_dir, export_config)
    if not layers:
        raise ValueError(
            "write_model_card found no quantized layer: pass an hfqat model (QAT or packed) or an out_dir "
            "holding a save_packed export (config.json with quantization_config.packed_layers)"
        )
    quant = _quant_config_dict(model, export_config)
    base_model = base_model if base_model is not None else _guess_base_model(model)
    bit_widths = sorted({row["bits"] for row in layers})
    average_bits = _average_bits(layers)
    weight_format = quant.get("weight_format", "int")

    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hfqat", "quantization", "qat", *[f"{b}-bit" for b in bit_widths],
              *(["mixed-precision"] if len(bit_widths) > 1 else []),
              *(["codebook", "weight-clustering"] if weight_format == "codebook" else [])],
        **({"base_model_relation": "quantized"} if base_model else {}),
        hfqat={"version": __version__, "weight_format": weight_format, "bits": bit_widths,
               "average_bits": round(average_bits, 3), "group_size": quant.get("group_size"),
               "symmetric": quant.get("symmetric") if weight_format == "int" else None,
               **_coverage_field(model)},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    embedded = []
    if not any(p.name == BIT_MAP_NAME for p in plot_paths):  # drawn from the allocation itself, history or not
        plot_bit_map(layers, out_dir / PLOTS_DIR / BIT_MAP_NAME,
                     title=f"weight bits per layer (average {average_bits:.2f})")
        embedded.append({"title": "Bit map", "path": f"{PLOTS_DIR}/{BIT_MAP_NAME}"})
    for src in plot_paths:
        dst = out_dir / PLOTS_DIR / src.name
        dst.parent.mkdir(exist_ok=True)
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        embedded.append({"title": src.stem.replace("_", " ").capitalize(), "path": f"{PLOTS_DIR}/{src.name}"})

    if has_tokenizer is None:
        has_tokenizer = any((out_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or CARD_TEMPLATE),
        model_name=repo_id.split("/")[-1] if repo_id else out_dir.name,
        base_model=base_model,
        load_id=repo_id or "path/to/this/folder",
        has_tokenizer=has_tokenizer,
        hfqat_version=__version__,
        bits_label="/".join(str(b) for b in bit_widths) + "-bit",
        codebook=weight_format == "codebook",
        average_bits=average_bits,
        checkpoint_mb=_checkpoint_mb(out_dir),
        quant_settings=_quant_settings(quant),
        bit_summary=_bit_summary(layers),
        layers=[{**row, "params": "?" if row["params"] is None else f"{row['params']:,}"} for row in layers],
        plots=embedded,
        metrics_columns=columns,
        metrics_rows=metric_rows,
        training_rows=_training_rows(training_args),
        reproduce_command=_command_str(reproduce_command),
    )
    path = out_dir / "README.md"
    path.write_text(_scrub(str(card), redact), encoding="utf-8")
    return path


def _coverage_field(model: nn.Module | None) -> dict[str, float]:
    """{"quantized_fraction": share of the matrix weights quantized} for a fake-quant model (`hfqat.coverage`);
    nothing for a packed one (its packed layers hold no float weight to count)."""
    report = coverage(model) if model is not None else None
    return {"quantized_fraction": round(report["quantized_fraction"], 4)} if report and report["quantized_params"] \
        else {}


def _check_plots(plots: Sequence[str | os.PathLike] | None) -> list[Path]:
    paths = [Path(p) for p in (plots or [])]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"plots: {p} is not a file")
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"plots={names} has repeated file names; they would overwrite each other in {PLOTS_DIR}/")
    return paths


def _read_export_config(out_dir: Path) -> dict[str, Any]:
    """`quantization_config` of a save_packed export in out_dir, or {} when there is none."""
    config_file = out_dir / "config.json"
    if not config_file.is_file():
        return {}
    return json.loads(config_file.read_text()).get("quantization_config") or {}


def _layer_rows(model: nn.Module | None, export_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """[{name, bits, group_size, params}] from the model's QAT layers, else from the packed layer map; a layer with
    per-row widths gives one entry per width (its rows at that width)."""
    if model is not None:
        rows = []
        for name, layer in qat_layers(model):
            counts = ({layer.bits: layer.out_features} if layer.weight_row_bits is None else
                      dict(zip(*(t.tolist() for t in layer.weight_row_bits.unique(return_counts=True)))))
            rows += [{"name": name, "bits": int(b), "group_size": layer.spec.group_size,
                      "params": n * layer.in_features} for b, n in counts.items()]
        for name, experts in qat_experts(model):  # fused MoE experts: one row per tensor and width
            for pname, q in experts.quantizers.items():
                lay = q.layout
                widths = dict(zip(*(t.tolist() for t in q.weight_bits.unique(return_counts=True))))
                rows += [{"name": f"{name}.{pname}", "bits": int(b), "group_size": q.spec.group_size,
                          "params": n * lay.out_features * lay.in_features} for b, n in widths.items()]
        if rows:
            return rows
    packed = export_config.get("packed_layers") or _config_value(model, "packed_layers") or {}
    # config.json stores the map with sorted keys: restore module order (natural order without a model).
    order = {name: i for i, (name, _) in enumerate(model.named_modules())} if model is not None else {}
    rows = []
    for name in sorted(packed, key=lambda n: (order.get(n, len(order)), _natural_key(n))):
        entry = packed[name]
        if "experts" in entry:  # fused MoE experts (hfqat.export.packed_experts): per-expert widths
            for pname, e in entry["experts"].items():
                widths = {b: e["bits"].count(b) for b in sorted(set(e["bits"]))}
                rows += [{"name": f"{name}.{pname}", "bits": int(b), "group_size": e["group_size"],
                          "params": n * e["out_features"] * e["in_features"]} for b, n in widths.items()]
            continue
        module = _submodule(model, name)
        # exports record their sizes; older ones only through the model
        in_features = entry.get("in_features") or getattr(module, "in_features", None)
        counts = entry.get("row_bits") or {entry["bits"]: entry.get("out_features") or getattr(module, "out_features",
                                                                                                  None)}
        rows += [{"name": name, "bits": int(b), "group_size": entry.get("group_size"),
                  "params": in_features * n if in_features and n else None} for b, n in counts.items()]
    return rows


def _ct_layer_rows(out_dir: Path, export_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Card rows of a compressed-tensors export (`export_compressed_tensors`) read without a model: each quantized
    layer's width from its config group, its size from the weights file."""
    if export_config.get("quant_method") != "compressed-tensors":
        return []
    from safetensors import safe_open

    groups = [(g.get("targets") or [], g.get("weights") or {}) for g in (export_config.get("config_groups") or {})
              .values()]
    shapes: dict[str, list[int]] = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys = set(f.keys())
            for name in (key[:-len(".weight_scale")] for key in keys if key.endswith(".weight_scale")):
                shapes[name] = ([int(v) for v in f.get_tensor(f"{name}.weight_shape").tolist()]
                                if f"{name}.weight_shape" in keys else list(f.get_slice(f"{name}.weight").get_shape()))
    rows = []
    for name in sorted(shapes, key=_natural_key):
        weights = next((w for targets, w in groups if any(
            t == "Linear" or (t.startswith("re:") and re.fullmatch(t[3:], name)) for t in targets)), None)
        if weights:
            out_features, in_features = shapes[name]
            rows.append({"name": name, "bits": int(weights["num_bits"]),
                         "group_size": weights.get("group_size") or -1, "params": out_features * in_features})
    return rows


def _natural_key(name: str) -> list:
    """Sort key that puts layers.10 after layers.9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _submodule(model: nn.Module | None, name: str) -> nn.Module | None:
    if model is None:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _config_value(model: nn.Module | None, key: str) -> Any:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    return qc.get(key) if isinstance(qc, Mapping) else getattr(qc, key, None)


def _quant_config_dict(model: nn.Module | None, export_config: Mapping[str, Any]) -> dict[str, Any]:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None and not isinstance(qc, Mapping):
        qc = qc.to_dict()
    return dict(qc or export_config)


def _quant_settings(quant: Mapping[str, Any]) -> list[tuple[str, str]]:
    group, symmetric, act_bits = quant.get("group_size"), quant.get("symmetric"), quant.get("activation_bits")
    if quant.get("weight_format") == "codebook":
        method = "hfqat codebook / weight clustering (per-group learned fp32 centroids, packed indices)"
        grid = "codebook: 2^bits non-uniform centroids per group, k-means initialised, trained"
    elif quant.get("weight_format") == "fp8":
        method = "hfqat FP8 (e4m3 weights, one fp32 scale per output channel)"
        grid = "e4m3"
    else:
        method = "hfqat (uniform integer grid, real packed weights)"
        grid = None if symmetric is None else ("symmetric" if symmetric else "asymmetric (zero point)")
    rows = [
        ("method", method),
        ("weight format", quant.get("weight_format", "int")),
        ("default bits", quant.get("bits")),
        ("group size", "per output channel" if group == -1 else group),
        ("grid", grid),
        ("learned scales", quant.get("learn_scales")),
        ("rounding / clamping", f"{quant['rounding']} / {quant['clamping']}" if "rounding" in quant else None),
        ("activations", (("FP8 e4m3" if quant.get("weight_format") == "fp8" else f"int{act_bits}")
                         + " dynamic per token") if act_bits else "float"),
        ("kept in full precision", _kept_float(quant)),
    ]
    return [(key, str(value)) for key, value in rows if value is not None]


def _kept_float(quant: dict[str, Any]) -> str:
    """The default skip (the output head, unless it was packed) and the user's `modules_to_not_convert`."""
    head = [] if "lm_head" in (quant.get("packed_layers") or {}) else ["output head (default)"]
    return ", ".join(head + list(quant.get("modules_to_not_convert") or [])) or "none"


def _average_bits(layers: list[dict[str, Any]]) -> float:
    weight = [row["params"] or 1 for row in layers]  # layers of unknown size count equally
    return sum(row["bits"] * w for row, w in zip(layers, weight, strict=True)) / sum(weight)


def _bit_summary(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total = sum(row["params"] or 0 for row in layers)
    summary = []
    for bits in sorted({row["bits"] for row in layers}):
        rows = [row for row in layers if row["bits"] == bits]
        share = f"{100 * sum(r['params'] or 0 for r in rows) / total:.1f}%" if total else "?"
        summary.append({"bits": bits, "layers": len(rows), "share": share})
    return summary


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]] | None) -> tuple[list[str], list[tuple[str, list[str]]]]:
    if not metrics:
        return [], []
    if not isinstance(metrics, Mapping) or not all(isinstance(v, Mapping) for v in metrics.values()):
        raise ValueError(f"metrics={metrics!r} is invalid; expected {{'FP': {{'ppl': 12.3}}, 'QAT': {{...}}}}")
    columns = list(dict.fromkeys(key for values in metrics.values() for key in values))
    rows = [(str(name), [_fmt(values.get(col)) for col in columns]) for name, values in metrics.items()]
    return columns, rows


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (str, int, bool)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    return f"`{type(value).__name__}`"  # e.g. a teacher model object: its name, not its repr


def _training_rows(training_args: Any) -> list[tuple[str, str]]:
    sources = training_args if isinstance(training_args, (list, tuple)) else [training_args]
    items: dict[str, Any] = {}
    for source in sources:
        items.update(_settings_of(source))
    return [(str(k), _fmt(v)) for k, v in items.items() if "token" not in str(k).lower()]


def _settings_of(source: Any) -> dict[str, Any]:
    """Card rows of one settings object: a mapping, TrainingArguments (curated) or a dataclass (init fields)."""
    from transformers import TrainingArguments

    if source is None:
        return {}
    if isinstance(source, TrainingArguments):  # also subclasses such as trl's SFTConfig
        return {k: getattr(source, k) for k in TRAINING_ARG_KEYS if hasattr(source, k)}
    if isinstance(source, Mapping):
        return dict(source)
    if dataclasses.is_dataclass(source):  # e.g. QATCallback: its distillation / re-allocation settings
        return {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.init}
    raise ValueError(
        f"training_args of type {type(source).__name__} is invalid; allowed: a mapping, a dataclass (e.g. "
        "QATCallback), transformers.TrainingArguments, or a list of these"
    )


def _command_str(command: str | Sequence[str] | None) -> str | None:
    if command is None or isinstance(command, str):
        return command
    return shlex.join(str(part) for part in command)


def _checkpoint_mb(out_dir: Path) -> str | None:
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return f"{size / 1e6:.1f}" if size else None


def _guess_base_model(model: nn.Module | None) -> str | None:
    """The model's `name_or_path` when it is a Hub id (a local path is no valid `base_model`)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or ""
    if _HUB_REPO_ID.match(name) and not os.path.exists(name):
        return name
    return None


def _secrets(token: str | None) -> list[str]:
    """The token that will be sent (explicit, or huggingface_hub's default), to scrub from any text we write."""
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    return [token] if isinstance(token, str) and token else []


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
