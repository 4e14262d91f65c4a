"""The distributed code path on 2 CPU processes (gloo): FSDP2 and DDP (accelerate, via Trainer) with QATCallback.

One ``torchrun --nproc_per_node 2`` of this file per weight format (integer grid, codebook; imports dominate: both
parts share one launch). Each rank writes what it saw to JSON; the test compares the ranks:

- FSDP2 (``fully_shard`` per decoder layer, as accelerate does): weights *and* scales become sharded DTensors;
  QATCallback (snapshot teacher gathered per layer, Fisher sensitivity on shards, re-allocation) is driven
  through its Trainer events by a plain loop (Trainer refuses FSDP on CPU). Both ranks must end with the same
  allocation under the budget; the snapshot teacher checkpoint is written once; `unsharded_model` rebuilds the
  full model on rank 0 with the sharded model's logits, and `save_packed` (called on every rank) writes a packed
  checkpoint that reloads with those logits and bits.
- Teacher placement under FSDP2: a separate teacher sharded with ``fully_shard`` gives the whole teacher's loss;
  the snapshot teacher sharded (default) or whole on every rank (``replicate_teacher``) gives the same loss.
- DDP through a stock Trainer (accelerate's MULTI_CPU) with Hutchinson sensitivity, which measures each rank's
  own batch: without the cross-rank reduction the ranks would pick different bits. The same with per-row widths
  (``bits_granularity="row"``, integer grid only).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
from conftest import run_two_processes

WORLD = 2
BUDGET = 3.0


@pytest.mark.parametrize("weight_format", ["int", "codebook"])
def test_two_process_gloo(tmp_path, weight_format):
    run_two_processes(__file__, env={"HFQAT_TEST_OUT": str(tmp_path), "HFQAT_TEST_FORMAT": weight_format},
                      timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]

    for part in ("fsdp2", "ddp"):
        a, b = (r[part] for r in ranks)
        assert a["allocation"] == b["allocation"], part
        assert len(set(a["allocation"].values())) > 1, part  # re-allocation really moved bits
        assert a["average_bits"] <= BUDGET, part
        assert a["history_steps"] == b["history_steps"] and len(a["history_steps"]) > 1, part
    if weight_format == "int":  # per-row widths under DDP: every rank holds the same rows, under the budget
        a, b = (r["ddp_rows"] for r in ranks)
        assert a["row_bits"] == b["row_bits"] and a["average_bits"] <= BUDGET
        assert any(len(set(bits)) > 1 for bits in a["row_bits"].values())
        assert a["history_steps"] == b["history_steps"] and len(a["history_steps"]) > 1
    fsdp = [r["fsdp2"] for r in ranks]
    assert all(f["sharded"] for f in fsdp)  # the path under test really had DTensor weights and scales
    if weight_format == "int":  # codebooks: no grid scales and no clip ratios
        assert all(f["local_refit_exact"] for f in fsdp)
        assert fsdp[0]["clip_ratios_vary"]
    assert fsdp[0]["teacher_file"] and fsdp[0]["unsharded_max_diff"] == 0.0 and fsdp[0]["unsharded_allocation_equal"]
    assert fsdp[0]["packed_max_diff"] <= 1e-4 and fsdp[0]["packed_allocation_equal"]  # save_packed gathered
    assert fsdp[0]["clip_equal_unsharded"]  # shard-reduced clip fit = whole fit
    assert fsdp[1]["unsharded_is_none"]
    assert all(math.isfinite(v) for f in fsdp for v in f["losses"])
    for teacher in (r["teacher_placement"] for r in ranks):
        assert teacher["teacher_sharded"] and teacher["distill_part"] > 1e-3  # the KD term is really in the loss
        assert teacher["loss_diff"] < 1e-5
        assert teacher["snapshot_sharded"] and teacher["replicated_snapshot_whole"]
        assert teacher["snapshot_mixes_kd"] and teacher["snapshot_loss_diff"] < 1e-6
    # a sharded snapshot holds this rank's rows only: the ranks' shares add up to one whole copy
    assert sum(r["teacher_placement"]["snapshot_bytes"] for r in ranks) == ranks[0]["teacher_placement"][
        "replicated_snapshot_bytes"]
    scores = [r["ddp_checkpoint_scores"] for r in ranks]
    assert scores[0]["at_save"], "kfac measured nothing before the checkpoint"
    for name, per_bits in scores[0]["at_save"].items():  # the same on both ranks, and what rank 0 saved
        assert per_bits == pytest.approx(scores[1]["at_save"][name], rel=1e-9)
        assert per_bits == pytest.approx(scores[0]["saved"][name], rel=1e-9)
    ddp = [r["ddp"] for r in ranks]
    assert ddp[0]["history_file"] and not ddp[1]["history_file"]  # rank 0 alone writes
    assert len(ddp[0]["logged_mix_errors"]) == 8 and max(ddp[0]["logged_mix_errors"]) < 2e-3


def test_empty_copy_is_built_without_zero3_init(monkeypatch):
    """Under a live ZeRO-3 config transformers builds models inside deepspeed.zero.Init (a collective); the copy
    that `save_packed` builds on rank 0 alone must not enter it (it would hang the other ranks' barrier)."""
    import torch
    from transformers.integrations import deepspeed as hf_deepspeed

    from hfqat.export.unshard import empty_copy
    from hfqat.quant.modeling import qat_layers

    class LiveZero3Config:
        def __init__(self):
            self.config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    model = _tiny_model()
    live = LiveZero3Config()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", lambda: live)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # entering zero.Init would import it: fail loudly
    with pytest.raises(ImportError):
        type(model)._from_config(model.config)  # what a plain construction would do here
    copy = empty_copy(model)
    assert all(p.device == torch.device("meta") for p in copy.parameters())
    layers = list(qat_layers(model))
    assert [(name, type(layer), layer.spec) for name, layer in qat_layers(copy)] == [
        (name, type(layer), layer.spec) for name, layer in layers] and layers


# -- worker (runs under torchrun) -----------------------------------------------------------------------------------
def _tiny_model(bits_granularity: str = "layer"):
    import torch
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    import hfqat
    from hfqat.quant.codebook import fit_codebooks
    from hfqat.quant.modeling import qat_layers, quantize_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    weight_format = os.environ.get("HFQAT_TEST_FORMAT", "int")
    quantize_model(model, hfqat.QATConfig(bits=4, group_size=32, weight_format=weight_format,
                                          bits_granularity=bits_granularity))
    if weight_format == "codebook":  # importance-weighted k-means (kept on the layers as whole (out, in) buffers)
        fit_codebooks(model, {name: torch.rand_like(layer.weight) + 0.5 for name, layer in qat_layers(model)})
    return model


def _fsdp2_part(out: Path) -> dict:
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import (
        AutoModelForCausalLM,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    import hfqat
    from hfqat import distributed as hd
    from hfqat.export.packed import save_packed
    from hfqat.export.unshard import unsharded_model
    from hfqat.quant.modeling import qat_layers
    from hfqat.quant.primitives import init_scales
    from hfqat.train.callback import TEACHER_FILE, QATCallback
    from hfqat.train.candidates import fit_clip_ratios

    model = _tiny_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    _, first = next(qat_layers(model))
    sharded = isinstance(first.weight, DTensor) and isinstance(first.weight_scale, DTensor)

    steps = 8
    args = TrainingArguments(str(out / "fsdp2"), max_steps=steps, use_cpu=True, report_to=[])
    state, control = TrainerState(max_steps=steps, is_world_process_zero=hd.is_main_process()), TrainerControl()
    callback = QATCallback(budget_bits=BUDGET, reallocate_every=2, write_plots=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    callback.on_train_begin(args, state, control, model=model)
    generator = torch.Generator().manual_seed(100 + hd.rank())  # each rank its own data
    losses = []
    for _ in range(steps):
        callback.on_step_begin(args, state, control)
        ids = torch.randint(0, 256, (2, 24), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        callback.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        callback.on_optimizer_step(args, state, control)  # grid updates on sharded (DTensor) weights
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control)
        losses.append(loss.item())

    checkpoint = Path(args.output_dir) / f"checkpoint-{steps}"
    if hd.is_main_process():
        checkpoint.mkdir(parents=True)
    hd.barrier()
    callback.on_save(args, state, control)
    callback.on_train_end(args, state, control)

    # a re-fit on each rank's rows (local_view) equals the re-fit of the whole gathered weight
    _, layer = next(qat_layers(model))
    full_scale, _ = init_scales(layer.weight.full_tensor(), layer.bits, 32, True, "mse")
    with hd.local_view([layer]):
        layer.reset_quant_params()  # what set_bits does after changing the bits
    local_refit_exact = torch.equal(layer.weight_scale.full_tensor(), full_scale)

    # clip ratios fitted on row shards (errors reduced over ranks) = those fitted on the whole weights
    layers = list(qat_layers(model))
    with hd.local_view(layer for _, layer in layers):
        callback._estimator.refit_clip(layers)
    sharded_clip = callback._estimator.clip

    model.eval()
    ids = torch.arange(24).reshape(1, 24)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    copy = unsharded_model(model)
    save_packed(model, out / "packed")  # every rank calls it; rank 0 writes
    result = {"sharded": sharded, "losses": losses, "allocation": hfqat.bit_allocation(model),
              "average_bits": hfqat.average_bits(model), "history_steps": [h["step"] for h in callback.history],
              "teacher_file": (checkpoint / TEACHER_FILE).is_file(), "unsharded_is_none": copy is None,
              "local_refit_exact": local_refit_exact}
    if copy is not None:
        with torch.no_grad():
            result["unsharded_max_diff"] = (copy(input_ids=ids).logits - logits).abs().max().item()
        result["unsharded_allocation_equal"] = hfqat.bit_allocation(copy) == result["allocation"]
        result["clip_equal_unsharded"] = sharded_clip == {
            name: fit_clip_ratios(layer, callback.bit_choices) for name, layer in qat_layers(copy)}
        result["clip_ratios_vary"] = len({v for per_bits in sharded_clip.values() for v in per_bits.values()}) > 1
        packed = AutoModelForCausalLM.from_pretrained(out / "packed")
        with torch.no_grad():
            result["packed_max_diff"] = (packed(input_ids=ids).logits - logits).abs().max().item()
        packed_bits = {name: spec["bits"] for name, spec in packed.config.quantization_config.packed_layers.items()}
        result["packed_allocation_equal"] = packed_bits == result["allocation"]
    return result


def _teacher_placement_part(out: Path) -> dict:
    """Where the teacher lives under FSDP2, and that it does not change the loss.

    - A separate teacher model stays where the user puts it, here sharded with ``fully_shard`` like the student:
      its distillation term must be the one the whole (unsharded) teacher gives.
    - The snapshot teacher, sharded like the weights (default) or whole on every rank (``replicate_teacher``):
      the same loss either way.
    """
    import copy

    import torch
    import torch.nn.functional as F
    from conftest import tiny_config
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import (
        AutoModelForCausalLM,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    from hfqat import distributed as hd
    from hfqat.train.callback import QATCallback
    from hfqat.train.distillation import distillation_loss

    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama"))
    whole_teacher = copy.deepcopy(teacher).eval()
    student = _tiny_model()
    for model in (teacher, student):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    args = TrainingArguments(str(out / "teacher-placement"), max_steps=1, use_cpu=True, report_to=[])
    state = TrainerState(max_steps=1, is_world_process_zero=hd.is_main_process())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7 + hd.rank()))

    alpha, temperature = 0.5, 2.0

    def training_step(**teacher_kwargs) -> dict:
        """The student's training loss under a QATCallback, and where its snapshot teacher (if any) lives."""
        callback = QATCallback(**teacher_kwargs, distill_weight=alpha, temperature=temperature, budget_bits=None,
                               reallocate_every=0, write_plots=False)
        callback.on_train_begin(args, state, TrainerControl(), model=student)
        out = student(input_ids=ids, labels=ids)
        snapshot = getattr(callback._hook.teacher, "tensors", None)
        step = {"out": out, "bytes": callback._hook.teacher.nbytes() if snapshot else None,
                "sharded": [isinstance(t, DTensor) for t in (snapshot or {}).values()]}
        callback.on_train_end(args, state, TrainerControl())
        return step

    out = training_step(teacher=teacher)["out"]
    with torch.no_grad():
        teacher_logits = whole_teacher(input_ids=ids).logits
    task = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    kd = distillation_loss(out.logits, teacher_logits, temperature, ids)
    sharded, replicated = training_step(), training_step(replicate_teacher=True)
    return {"teacher_sharded": hd.is_sharded(teacher), "loss_diff": abs(out.loss - (task + alpha * (kd - task))).item(),
            "distill_part": alpha * kd.item(), "snapshot_sharded": all(sharded["sharded"]),
            "replicated_snapshot_whole": not any(replicated["sharded"]), "snapshot_bytes": sharded["bytes"],
            "replicated_snapshot_bytes": replicated["bytes"],
            "snapshot_loss_diff": abs(sharded["out"].loss - replicated["out"].loss).item(),
            "snapshot_mixes_kd": abs(sharded["out"].loss.item() - task.item()) > 1e-3}


def _ddp_rows_part(out: Path) -> dict:
    from conftest import text_dataset
    from transformers import Trainer, TrainingArguments

    import hfqat
    from hfqat.quant.modeling import qat_layers
    from hfqat.train.callback import QATCallback

    model = _tiny_model("row")
    args = TrainingArguments(str(out / "ddp-rows"), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    callback = QATCallback(budget_bits=BUDGET, reallocate_every=2, sensitivity="hutchinson", write_plots=False)
    Trainer(model=model, args=args, train_dataset=text_dataset(32), callbacks=[callback]).train()
    return {"row_bits": {name: layer.weight_row_bits.tolist() for name, layer in qat_layers(model)},
            "average_bits": hfqat.average_bits(model), "history_steps": [h["step"] for h in callback.history]}


def _ddp_part(out: Path) -> dict:
    from conftest import text_dataset
    from transformers import Trainer, TrainingArguments

    import hfqat
    from hfqat import distributed as hd
    from hfqat.train.callback import HISTORY_FILE, QATCallback

    model = _tiny_model()
    folder = out / f"ddp-rank{hd.rank()}"  # separate folders: shows which rank wrote files
    args = TrainingArguments(str(folder), max_steps=8, per_device_train_batch_size=2, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)
    callback = QATCallback(budget_bits=BUDGET, reallocate_every=2, sensitivity="hutchinson", write_plots=False)
    trainer = Trainer(model=model, args=args, train_dataset=text_dataset(32), callbacks=[callback])
    trainer.train()
    alpha = callback.distill_weight
    # The logged parts must mix into Trainer's (globally averaged) loss, as on one process.
    mix_errors = [abs((1 - alpha) * e["task_loss"] + alpha * e["distill_loss"] - e["loss"]) / e["loss"]
                  for e in trainer.state.log_history if "task_loss" in e]
    return {"allocation": hfqat.bit_allocation(model), "average_bits": hfqat.average_bits(model),
            "logged_mix_errors": mix_errors,
            "history_steps": [h["step"] for h in callback.history],
            "history_file": (folder / HISTORY_FILE).is_file()}


def _ddp_checkpoint_scores_part(out: Path) -> dict:
    """kfac measures each rank's own activations: at a checkpoint inside a measured window (step 7, before the
    re-allocation at 8) every rank must hold the mean EMAs, which rank 0 saves (else a resumed run averages rank 0's
    EMAs with themselves)."""
    from conftest import text_dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hfqat import distributed as hd
    from hfqat.train.callback import QATCallback

    class AtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append({name: dict(per_bits) for name, per_bits in callback._estimator.scores.items()})

    seen: list[dict] = []
    folder = out / "ddp-kfac"
    args = TrainingArguments(str(folder), max_steps=9, per_device_train_batch_size=2, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="steps", save_steps=7, disable_tqdm=True, seed=0)
    callback = QATCallback(budget_bits=BUDGET, reallocate_every=8, sensitivity="kfac", write_plots=False)
    Trainer(model=_tiny_model(), args=args, train_dataset=text_dataset(32), callbacks=[callback, AtSave()]).train()
    hd.barrier()
    state = json.loads((folder / "checkpoint-7" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["QATCallback"]["attributes"]["_saved_state"]["estimator"]["scores"]
    return {"at_save": {n: {str(b): v for b, v in per.items()} for n, per in seen[0].items()}, "saved": saved}


def _worker() -> None:
    import torch
    import torch.distributed as dist

    from hfqat import distributed as hd

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = Path(os.environ["HFQAT_TEST_OUT"])
    result = {"fsdp2": _fsdp2_part(out), "teacher_placement": _teacher_placement_part(out), "ddp": _ddp_part(out),
              "ddp_checkpoint_scores": _ddp_checkpoint_scores_part(out)}
    if os.environ.get("HFQAT_TEST_FORMAT", "int") == "int":  # per-row widths: integer grids only
        result["ddp_rows"] = _ddp_rows_part(out)
    (out / f"rank{hd.rank()}.json").write_text(json.dumps(result))
    hd.barrier()  # neither rank tears its connections down while the other may still use them
    hd.end_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker()
