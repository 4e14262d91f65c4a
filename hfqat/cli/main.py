"""`hfqat` command line: train | ptq | eval | export | push | demo.

Each command parses the recipe sections it uses (`hfqat.cli.recipe`) with one `transformers.HfArgumentParser`,
so every field (every `TrainingArguments` field included) is also a flag; a recipe file given first supplies
the defaults and flags override them::

    hfqat train recipes/w4_qat_kd.yaml --max_steps 20
    hfqat ptq recipes/w4_qat_kd.yaml --method gptq --ptq_output_dir out/gptq
    hfqat eval --model out/gptq --tasks ppl mc
    hfqat export out/qat/final --format packed --export_dir out/packed
    hfqat push out/packed --repo_id me/model        # token from HF_TOKEN / huggingface-cli login
    hfqat demo --steps 20
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .recipe import SECTIONS, RecipeError, flat_defaults, load_recipe

COMMAND_SECTIONS = {
    "train": ["model", "quant", "data", "qat", "lora", "eval", "training"],
    "ptq": ["model", "quant", "data", "ptq", "eval"],
    "eval": ["model", "data", "eval"],
}
DEFAULT_CACHE = Path(os.environ.get("HFQAT_CACHE", Path.home() / ".cache" / "hfqat"))


@dataclass
class ExportArguments:
    checkpoint: str = field(metadata={"help": "An hfqat (fake-quant) checkpoint folder."})
    export_dir: str = field(metadata={"help": "Output folder."})
    format: str = field(default="packed", metadata={"help": "packed | compressed-tensors"})


@dataclass
class PushArguments:
    export_dir: str = field(metadata={"help": "A save_packed folder."})
    repo_id: str = field(metadata={"help": "Hub repo id."})
    private: bool | None = field(default=None, metadata={"help": "Create the repo private."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub endpoint (default HF_ENDPOINT)."})


def resolve_model(name: str, cache_dir: str | None = None) -> str:
    """A loadable path: embedded:smollm2 is dequantized from its GGUF once into the cache."""
    if name.startswith("embedded:"):
        from ..integrations.gguf import embedded_smollm2, gguf_to_float_checkpoint

        return str(gguf_to_float_checkpoint(embedded_smollm2(), Path(cache_dir or DEFAULT_CACHE) / "smollm2-f32"))
    return name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(path: str, field_name: str = "model.model"):
    """The tokenizer saved with a model; a local folder without tokenizer files is named as such (transformers
    would otherwise suggest installing sentencepiece or tiktoken)."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise RecipeError(f"{field_name}={path!r} has no tokenizer files (any of {list(TOKENIZER_FILES)}); save the "
                          "tokenizer there with tokenizer.save_pretrained(folder)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:  # not a folder, no such Hub id, offline
        raise RecipeError(f"{field_name}={path!r} cannot be loaded: {err}") from None
    except ValueError as err:
        raise RecipeError(f"{field_name}={path!r}: no usable tokenizer: {err}") from None


def load_model(model_args, quant_config=None):
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(model_args.model, model_args.model_cache_dir)
    tokenizer = load_tokenizer(path)  # first: a folder without one fails before minutes of model loading
    dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    # On a GPU machine, load onto this process's GPU: the quantizer fits every layer's scales right after loading
    # (an MSE clip search: minutes on a CPU for a 1B model, a second on a GPU); Trainer / accelerate take it from there.
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant_config,
                                                     device_map=device_map)
    except OSError as err:  # not a model folder, no such Hub id, offline
        raise RecipeError(f"model.model={model_args.model!r} cannot be loaded: {err}") from None
    return model, tokenizer


def _parse(command: str, argv: list[str]):
    from transformers import HfArgumentParser

    sections = {}
    if argv and not argv[0].startswith("-"):
        sections = load_recipe(argv[0])
        argv = argv[1:]
    used = COMMAND_SECTIONS[command]
    parser = HfArgumentParser([SECTIONS[name] for name in used], prog=f"hfqat {command}")
    parser.set_defaults(**flat_defaults(sections, used))
    return dict(zip(used, parser.parse_args_into_dataclasses(args=argv)))


def _evaluate(model, tokenizer, data, eval_args) -> dict:
    from .data import load_text
    from .evaluation import multiple_choice, perplexity

    results = {}
    if "ppl" in eval_args.tasks:
        text = load_text(data.eval_file, data.text_column, "eval")
        results["ppl"] = perplexity(model.eval(), tokenizer, text, window=eval_args.ppl_window or data.block_size,
                                    stride=eval_args.ppl_stride, max_tokens=eval_args.max_eval_tokens,
                                    batch_size=eval_args.eval_batch_size)
    if "mc" in eval_args.tasks:
        results["mc"] = multiple_choice(model.eval(), tokenizer, eval_args.mc_tasks, eval_args.mc_backend,
                                        eval_args.eval_batch_size)
    return results


def _save_and_evaluate(model, tokenizer, out: Path, data, eval_args) -> dict:
    """Save the (fake-quant) model + tokenizer to `out`, evaluate, write `out/eval_results.json`."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    results = _evaluate(model, tokenizer, data, eval_args)
    _report(results, out / "eval_results.json")
    return results


def cmd_train(argv: list[str]) -> dict:
    from transformers import Trainer, default_data_collator

    from ..distributed import is_sharded
    from ..export.unshard import unsharded_model
    from ..train.callback import QATCallback
    from .data import load_blocks

    a = _parse("train", argv)
    model, tokenizer = load_model(a["model"], a["quant"].to_qat_config())
    data, lora, training = a["data"], a["lora"], a["training"]
    if lora.use_lora:
        from peft import LoraConfig

        from ..integrations.peft import apply_lora

        targets = lora.lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]
        model = apply_lora(model, LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, target_modules=targets),
                           train_scales=lora.lora_train_scales)
    callbacks = [QATCallback(**a["qat"].callback_kwargs())] if a["qat"].use_callback else []
    train_blocks = load_blocks(tokenizer, data.train_file, data.block_size, data.max_train_blocks, data.text_column)
    trainer = Trainer(model=model, args=training, train_dataset=train_blocks, data_collator=default_data_collator,
                      callbacks=callbacks)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    if lora.use_lora:
        model = model.merge_and_unload()
    if is_sharded(model):
        # FSDP2 / ZeRO-3: gather a whole copy on the main process (a collective: every rank takes part).
        model = unsharded_model(model)
        if model is not None:
            model.to(training.device)
    if not trainer.is_world_process_zero():
        return {}  # the main process saves and evaluates the one final model
    return _save_and_evaluate(model, tokenizer, Path(training.output_dir) / "final", data, a["eval"])


def cmd_ptq(argv: list[str]) -> dict:
    import torch

    from ..quant.ptq import gptq, rtn
    from .data import load_blocks

    a = _parse("ptq", argv)
    model, tokenizer = load_model(a["model"], a["quant"].to_qat_config())
    ptq, data = a["ptq"], a["data"]
    if ptq.method == "gptq":
        blocks = load_blocks(tokenizer, data.train_file, data.block_size, ptq.calibration_blocks, data.text_column)
        gptq(model, (torch.as_tensor(b["input_ids"]).unsqueeze(0) for b in blocks), ptq.percdamp)
    else:
        rtn(model)
    return _save_and_evaluate(model, tokenizer, Path(ptq.ptq_output_dir or f"hfqat-ptq-{ptq.method}"), data,
                              a["eval"])


def cmd_eval(argv: list[str]) -> dict:
    a = _parse("eval", argv)
    model, tokenizer = load_model(a["model"])
    results = _evaluate(model, tokenizer, a["data"], a["eval"])
    _report(results, None)
    return results


def cmd_export(argv: list[str]) -> Path:
    from transformers import AutoModelForCausalLM, HfArgumentParser

    from ..export.compressed_tensors import export_compressed_tensors
    from ..export.packed import save_packed

    (args,) = HfArgumentParser([ExportArguments], prog="hfqat export").parse_args_into_dataclasses(args=argv)
    exporters = {"packed": save_packed, "compressed-tensors": export_compressed_tensors}
    if args.format not in exporters:
        raise RecipeError(f"export --format={args.format!r} is invalid; allowed values: {list(exporters)}")
    tokenizer = load_tokenizer(args.checkpoint, "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    path = exporters[args.format](model, args.export_dir, tokenizer=tokenizer)
    print(f"exported {args.format} checkpoint to {path}")
    return path


def cmd_push(argv: list[str]) -> str:
    from transformers import HfArgumentParser

    from ..hub.push import push_packed_dir

    (args,) = HfArgumentParser([PushArguments], prog="hfqat push").parse_args_into_dataclasses(args=argv)
    url = push_packed_dir(args.export_dir, args.repo_id, token=os.environ.get("HF_TOKEN"), endpoint=args.endpoint,
                          private=args.private)
    print(url)
    return url


def cmd_demo(argv: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

    from .demo import DemoArguments, run_demo

    (args,) = HfArgumentParser([DemoArguments], prog="hfqat demo").parse_args_into_dataclasses(args=argv)
    path = resolve_model(args.model)

    def load_float(quant_config):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config)
        return model, AutoTokenizer.from_pretrained(path)

    return run_demo(args, load_float, command=["hfqat", "demo", *argv])


def _report(results: dict, path: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


COMMANDS = {"train": cmd_train, "ptq": cmd_ptq, "eval": cmd_eval, "export": cmd_export, "push": cmd_push,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except RecipeError as err:
        print(f"hfqat {argv[0]}: {err}", file=sys.stderr)
        return 2
    from ..distributed import end_process_group

    end_process_group()  # under accelerate launch: a clean end on every rank
    return 0


if __name__ == "__main__":
    sys.exit(main())
