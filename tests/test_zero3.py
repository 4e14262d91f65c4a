"""DeepSpeed ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator, gloo) through a stock Trainer with QATCallback.

ZeRO-3's optimizer keeps its own fp32 copy of every parameter partition and copies it over the parameter after each
step, so the scales a re-allocation re-fits in place must reach that copy too. Checked end to end: a run resumed
from its mid-run checkpoint repeats the uninterrupted run exactly (losses and every allocation), and after
training the optimizer's fp32 copy of every quantizer parameter equals the parameter. `save_packed`, called on
every rank, gathers the partitions on rank 0 into a packed checkpoint with the trained bits and the model's logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_two_processes

STEPS, SAVE_AT = 8, 4


def test_zero3_two_processes_resume_exactly(tmp_path):
    pytest.importorskip("deepspeed")

    def launch(out: Path, *extra: str) -> dict:
        run_two_processes(__file__, str(out), *extra, env={"DS_ACCELERATOR": "cpu"})
        return json.loads((out / "result.json").read_text())

    full = launch(tmp_path / "full")
    resumed = launch(tmp_path / "resumed", str(tmp_path / "full" / f"checkpoint-{SAVE_AT}"))
    assert full["zero3"] and len(full["losses"]) == STEPS
    assert [h["step"] for h in full["history"]] == [0, 2, 4, 6]
    assert len({b for h in full["history"] for b in h["bits"].values()}) > 1  # bits really moved
    assert resumed["history"] == full["history"]
    assert resumed["losses"] == {step: full["losses"][step] for step in resumed["losses"]}  # steps 5..8
    assert full["masters_equal"] and resumed["masters_equal"]
    assert full["packed_bits_equal"] and full["packed_max_diff"] <= 1e-4


def _worker(out: Path, resume: str | None) -> None:
    import deepspeed
    import torch
    from conftest import text_dataset, tiny_config
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hfqat
    from hfqat.distributed import end_process_group, is_sharded
    from hfqat.export.packed import save_packed
    from hfqat.quant.modeling import qat_layers, quantize_model
    from hfqat.train.callback import QATCallback

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    quantize_model(model, hfqat.QATConfig(bits=4, group_size=32))
    auto = "auto"
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": auto, "train_batch_size": auto,
             "gradient_accumulation_steps": auto, "gradient_clipping": auto,
             "optimizer": {"type": "AdamW", "params": {"lr": auto, "weight_decay": auto, "betas": auto, "eps": auto}}}
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="steps", save_steps=SAVE_AT, seed=0,
                             logging_steps=1, disable_tqdm=True, deepspeed=zero3)
    # Variance sensitivity: ZeRO-3 keeps gradients inside its engine (README).
    callback = QATCallback(budget_bits=3.0, reallocate_every=2, sensitivity="variance", write_plots=False)
    trainer = Trainer(model=model, args=args, train_dataset=text_dataset(32), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    masters_equal = True
    for _, layer in qat_layers(model):
        for param in layer.quant_parameters():
            master = safe_get_full_fp32_param(param)  # a collective
            with deepspeed.zero.GatheredParameters([param]):
                masters_equal &= torch.equal(master.reshape(param.shape), param.detach().float())
    ids = torch.arange(24).reshape(1, 24)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # every rank: ZeRO-3 gathers each layer for the forward
    save_packed(model, out / "packed")  # every rank; rank 0 writes
    if trainer.is_world_process_zero():
        packed = AutoModelForCausalLM.from_pretrained(out / "packed")
        with torch.no_grad():
            packed_max_diff = (packed(input_ids=ids).logits - logits).abs().max().item()
        packed_bits = {name: spec["bits"] for name, spec in packed.config.quantization_config.packed_layers.items()}
        losses = {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
        result = {"zero3": is_sharded(model), "losses": losses, "history": callback.history,
                  "masters_equal": bool(masters_equal), "packed_max_diff": packed_max_diff,
                  "packed_bits_equal": packed_bits == callback.history[-1]["bits"]}
        (out / "result.json").write_text(json.dumps(result))
    end_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
