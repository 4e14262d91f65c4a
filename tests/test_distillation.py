"""Distillation: the KL term, the teachers, and the loss hook under Trainer (accumulation, checkpointing, eval)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, text_dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfqat
from hfqat.quant.modeling import qat_layers
from hfqat.train import fused_kl
from hfqat.train.callback import QATCallback
from hfqat.train.distillation import (
    DistillationHook,
    SnapshotTeacher,
    build_teacher,
    distillation_loss,
    teacher_dtype,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(path, bits=2):
    # 2 bits: the student differs clearly from the teacher, so the KL term is far from 0.
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(bits=bits, group_size=32))


def _args(out, **kw):
    base = dict(max_steps=1, per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[],
                learning_rate=1e-2, use_cpu=True, disable_tqdm=True, seed=0, optim="sgd", lr_scheduler_type="constant")
    return TrainingArguments(str(out), **{**base, **kw})


# -- the loss -----------------------------------------------------------------------------------------------------
def test_distillation_loss_matches_manual_kl_and_masks():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 3] = -100  # position 2 predicts labels[3]: excluded
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding
    T = 2.0
    loss = distillation_loss(s, t, T, labels, mask)

    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[:, -1] = False
    valid[0, 2] = False
    valid[1, 4:] = False
    p = F.softmax(t[valid] / T, -1)
    manual = (p * (p.log() - F.log_softmax(s[valid] / T, -1))).sum(-1).mean() * T * T
    torch.testing.assert_close(loss, manual)

    # Changing excluded positions changes nothing; a given num_items_in_batch is the divisor.
    s2 = s.clone()
    s2[0, 2] += 5
    s2[1, 4:] -= 3
    torch.testing.assert_close(distillation_loss(s2, t, T, labels, mask), loss)
    torch.testing.assert_close(distillation_loss(s, t, T, labels, mask, num_items_in_batch=20), manual * valid.sum() / 20)
    assert float(distillation_loss(t, t, T, labels, mask)) == pytest.approx(0.0, abs=1e-6)


FUSED_KL = pytest.param("cuda", marks=pytest.mark.skipif(not fused_kl.available(), reason="needs CUDA and Triton"))


@pytest.mark.parametrize("device", ["cpu", FUSED_KL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_gradient_matches_autograd_of_the_plain_formula(monkeypatch, dtype, device):
    """The loss and its student gradient, computed chunk by chunk (here 3 rows a chunk, 12 rows: four chunks, masked
    rows inside them) or on CUDA by the fused kernel, equal autograd through the plain fp32 expression; a larger
    teacher vocabulary is cut."""
    monkeypatch.setattr("hfqat.train.distillation.KL_CHUNK_ELEMENTS", 3 * 11)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 11, generator=g).to(device, dtype).requires_grad_()
    t = torch.randn(2, 6, 13, generator=g).to(device, dtype)
    labels = torch.randint(0, 11, (2, 6), generator=g).to(device)
    labels[1, 2] = -100
    T = 1.5
    loss = distillation_loss(s, t, T, labels, num_items_in_batch=7)
    loss.backward()

    ref = s.detach().clone().requires_grad_()
    valid = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
    log_t = F.log_softmax(t[..., :11][valid].float() / T, -1)
    manual = F.kl_div(F.log_softmax(ref[valid].float() / T, -1), log_t, log_target=True, reduction="sum") * T * T / 7
    manual.backward()
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-6)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(s.grad.float(), ref.grad.float(), **tol)
    assert s.grad.dtype == dtype and bool((s.grad[~valid] == 0).all())


# -- teachers -----------------------------------------------------------------------------------------------------
def test_snapshot_teacher_is_the_float_model_and_shares_the_rest(tiny_model_dir, input_ids):
    path = tiny_model_dir("llama")
    student = _model(path)
    float_model = AutoModelForCausalLM.from_pretrained(path)
    teacher = SnapshotTeacher(student)
    with torch.no_grad():
        expected = float_model(input_ids).logits
    torch.testing.assert_close(teacher.logits((input_ids,), {}), expected)
    assert not torch.allclose(student(input_ids).logits, expected, atol=1e-3)  # the student is quantized
    # Only the quantized layers' float weights are copied.
    linear_bytes = sum(layer.weight.numel() * layer.weight.element_size() for _, layer in qat_layers(student))
    assert teacher.nbytes() == linear_bytes
    assert all("forward" not in vars(layer) for _, layer in qat_layers(student))  # swap undone


def test_snapshot_teacher_save_load_roundtrip(tiny_model_dir, tmp_path, input_ids):
    student = _model(tiny_model_dir("llama"))
    teacher = SnapshotTeacher(student)
    expected = teacher.logits((input_ids,), {})
    with torch.no_grad():  # the student trains on: the restored teacher must still be the old weights
        for _, layer in qat_layers(student):
            layer.weight.add_(0.01)
    teacher.save(tmp_path / "t.safetensors")
    torch.testing.assert_close(SnapshotTeacher.load(student, tmp_path / "t.safetensors").logits((input_ids,), {}),
                               expected)


def test_bf16_snapshot_teacher_is_the_float_model_under_bf16_autocast(tiny_model_dir, tmp_path, input_ids):
    path = tiny_model_dir("llama")
    student = _model(path)
    float_model = AutoModelForCausalLM.from_pretrained(path)
    teacher = SnapshotTeacher(student, dtype=torch.bfloat16)
    # stored in bf16: half the bytes of the float32 snapshot
    assert {t.dtype for t in teacher.tensors.values()} == {torch.bfloat16}
    assert teacher.nbytes() == SnapshotTeacher(student).nbytes() // 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = float_model(input_ids).logits
    logits = teacher.logits((input_ids,), {})
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    with torch.no_grad():
        exact = float_model(input_ids).logits
    assert not torch.equal(logits.float(), exact)  # it did compute in bf16
    torch.testing.assert_close(logits.float(), exact, rtol=0.05, atol=0.05)
    # reloaded in the same dtype it is the same teacher; reloaded with the student's dtype it keeps the bf16 weights
    teacher.save(tmp_path / "t.safetensors")
    again = SnapshotTeacher.load(student, tmp_path / "t.safetensors", dtype=torch.bfloat16)
    torch.testing.assert_close(again.logits((input_ids,), {}), logits, rtol=0, atol=0)
    as_saved = SnapshotTeacher.load(student, tmp_path / "t.safetensors")
    assert {t.dtype for t in as_saved.tensors.values()} == {torch.bfloat16}


def test_teacher_dtype_resolution():
    assert teacher_dtype("model") is None  # the student's own
    assert teacher_dtype("bfloat16") is torch.bfloat16
    assert teacher_dtype("float16") is torch.float16


def test_bf16_teacher_under_trainer_distills_and_is_saved_in_bf16(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    run = tmp_path / "run"
    trainer = Trainer(model=_model(path), args=_args(run, max_steps=2, save_steps=1, save_strategy="steps"),
                      train_dataset=text_dataset(8), callbacks=[QATCallback(teacher_dtype="bfloat16",
                                                                            reallocate_every=0)])
    trainer.train()
    assert next(e["distill_loss"] for e in trainer.state.log_history if "distill_loss" in e) > 1e-3
    saved = [f for f in (run / "checkpoint-1").iterdir() if "teacher" in f.name]
    assert saved, "the snapshot teacher is saved with the checkpoint"
    assert {t.dtype for t in load_file(str(saved[0])).values()} == {torch.bfloat16}


def test_teacher_as_model_and_as_path_match_the_snapshot_at_start(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    first = {}
    for name, teacher in [("snapshot", "snapshot"), ("path", str(path)),
                          ("model", AutoModelForCausalLM.from_pretrained(path).to(torch.float64))]:
        trainer = Trainer(model=_model(path), args=_args(tmp_path / name), train_dataset=text_dataset(4),
                          callbacks=[QATCallback(teacher=teacher, reallocate_every=0)])
        trainer.train()
        first[name] = next(e["distill_loss"] for e in trainer.state.log_history if "distill_loss" in e)
    assert first["snapshot"] > 1e-3
    assert first["path"] == pytest.approx(first["snapshot"], rel=1e-5)
    assert first["model"] == pytest.approx(first["snapshot"], rel=1e-4)  # float64 teacher on its own


def test_build_teacher_none_and_invalid():
    assert build_teacher(None, torch.nn.Linear(2, 2)) is None


# -- the hook -----------------------------------------------------------------------------------------------------
def test_hook_mixes_losses_in_training_only(tiny_model_dir, input_ids):
    path = tiny_model_dir("llama")
    student = _model(path)
    hook = DistillationHook(SnapshotTeacher(student), distill_weight=0.3, temperature=2.0)
    hook.attach(student)
    labels = input_ids.clone()
    labels[:, :5] = -100
    student.train()
    out = student(input_ids=input_ids, labels=labels)
    hook.detach()
    plain = student(input_ids=input_ids, labels=labels)
    teacher_logits = SnapshotTeacher(student).logits((), {"input_ids": input_ids})
    kd = distillation_loss(plain.logits, teacher_logits, 2.0, labels)
    torch.testing.assert_close(out.loss, 0.7 * plain.loss + 0.3 * kd)
    assert out.loss.requires_grad

    hook.attach(student)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=input_ids, labels=labels).loss,
                                   _eval_loss(student, input_ids, labels))
    hook.detach()


def _eval_loss(model, input_ids, labels):
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


def _ragged_dataset():
    """Labels with very different numbers of ignored positions per example (tests the normalisation)."""
    rows = text_dataset(8, seq_len=16, seed=3)
    for i, row in enumerate(rows):
        row["labels"][: 2 * i] = -100
    return rows


def _one_step_weights(path, out, **kw):
    model = _model(path)
    trainer = Trainer(model=model, args=_args(out, **kw), train_dataset=_ragged_dataset(),
                      callbacks=[QATCallback(reallocate_every=0)])
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def test_gradient_accumulation_and_checkpointing_give_the_same_step(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    ref, _ = _one_step_weights(path, tmp_path / "a", per_device_train_batch_size=8)
    accum, trainer = _one_step_weights(path, tmp_path / "b", per_device_train_batch_size=2,
                                       gradient_accumulation_steps=4)
    # transformers renamed gradient checkpointing to activation checkpointing (5.2x); the package admits both
    renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    ckpt, ckpt_trainer = _one_step_weights(path, tmp_path / "c", per_device_train_batch_size=4,
                                           gradient_accumulation_steps=2, **{name: True})
    assert getattr(ckpt_trainer.model, f"is_{name}")
    initial = {n: p.detach() for n, p in _model(path).named_parameters()}
    moved = sum(float((ref[n] - initial[n]).abs().sum()) for n in ref)
    assert moved > 0
    for name in ref:
        torch.testing.assert_close(accum[name], ref[name], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(ckpt[name], ref[name], atol=2e-6, rtol=1e-4)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["loss"] == pytest.approx(0.5 * log["task_loss"] + 0.5 * log["distill_loss"], rel=1e-4)


def test_pure_distillation_without_labels(tiny_model_dir, tmp_path):
    rows = [{"input_ids": r["input_ids"], "attention_mask": torch.ones_like(r["input_ids"])} for r in text_dataset(8)]
    trainer = Trainer(model=_model(tiny_model_dir("llama")), args=_args(tmp_path, max_steps=2),
                      train_dataset=rows, callbacks=[QATCallback(reallocate_every=0)])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all("task_loss" not in e for e in logs)
    assert logs[0]["loss"] == pytest.approx(logs[0]["distill_loss"], rel=1e-5)


def test_eval_loss_is_the_task_loss(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir("llama"))
    rows = text_dataset(4, seed=5)
    # Evaluation during training (the hook is attached), with the loss fully on distillation.
    trainer = Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=4, eval_strategy="steps",
                                              eval_steps=1),
                      train_dataset=text_dataset(4), eval_dataset=rows,
                      callbacks=[QATCallback(reallocate_every=0, distill_weight=1.0)])
    trainer.train()
    eval_loss = next(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e)
    ids = torch.stack([r["input_ids"] for r in rows])
    assert eval_loss == pytest.approx(float(_eval_loss(model.eval(), ids, ids)), rel=1e-5)


# -- trainers that compute the loss themselves -------------------------------------------------------------------
def test_compute_loss_func_gives_the_hook_path_step(tiny_model_dir, tmp_path):
    """`make_compute_loss_func` (the trainer computes the loss from the logits) = the forward-hook path: same
    weights after one accumulated step with ragged labels, same logged parts."""
    path = tiny_model_dir("llama")
    ref, ref_trainer = _one_step_weights(path, tmp_path / "hook", per_device_train_batch_size=4,
                                         gradient_accumulation_steps=2)
    model, callback = _model(path), QATCallback(reallocate_every=0)
    trainer = Trainer(model=model, args=_args(tmp_path / "func", per_device_train_batch_size=4,
                                              gradient_accumulation_steps=2),
                      train_dataset=_ragged_dataset(), callbacks=[callback],
                      compute_loss_func=callback.make_compute_loss_func())
    trainer.train()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), ref[name], atol=2e-6, rtol=1e-4)
    got, want = (next(e for e in t.state.log_history if "loss" in e) for t in (trainer, ref_trainer))
    for key in ("loss", "task_loss", "distill_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_compute_loss_func_eval_loss_is_the_task_loss(tiny_model_dir, tmp_path):
    model, rows = _model(tiny_model_dir("llama")), text_dataset(4, seed=5)
    callback = QATCallback(reallocate_every=0)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, per_device_eval_batch_size=4,
                                              eval_strategy="steps", eval_steps=1),
                      train_dataset=text_dataset(8), eval_dataset=rows, callbacks=[callback],
                      compute_loss_func=callback.make_compute_loss_func())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for e in logs:  # the evaluation after step 1 added nothing to step 2's logged parts
        assert e["loss"] == pytest.approx(0.5 * e["task_loss"] + 0.5 * e["distill_loss"], rel=1e-4)
    eval_loss = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]  # the final model's
    ids = torch.stack([r["input_ids"] for r in rows])
    assert eval_loss == pytest.approx(float(_eval_loss(model.eval(), ids, ids)), rel=1e-5)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _sft_rows():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"text": " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (20,), generator=g))}
                              for _ in range(16)])


def test_trl_sft_trainer(tiny_model_dir, tmp_path):
    """trl's SFTTrainer computes its loss from a fused LM head: without `make_compute_loss_func` the hook refuses
    (it would silently skip distillation); with it, SFTTrainer optimises the mixed loss."""
    trl = pytest.importorskip("trl")
    rows = _sft_rows()

    def trainer(out, callback, **kw):
        args = trl.SFTConfig(str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
        return trl.SFTTrainer(model=_model(tiny_model_dir("llama")), args=args, train_dataset=rows,
                              processing_class=_word_tokenizer(), callbacks=[callback], **kw)

    with pytest.raises(ValueError, match="compute_loss_func"):
        trainer(tmp_path / "plain", QATCallback(reallocate_every=0)).train()
    callback = QATCallback(reallocate_every=0)
    sft = trainer(tmp_path / "kd", callback, compute_loss_func=callback.make_compute_loss_func())
    sft.train()
    logs = [e for e in sft.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(e["distill_loss"] > 0 for e in logs)
    for e in logs:  # SFTTrainer optimised the mix, not its own cross-entropy
        assert e["loss"] == pytest.approx(0.5 * e["task_loss"] + 0.5 * e["distill_loss"], rel=1e-4)


def test_qat_sft_trainer(tiny_model_dir, tmp_path):
    """`hfqat.integrations.trl.QATSFTTrainer` trains on the mix without trl's deprecated compute_loss_func, and evaluates as
    SFTTrainer does."""
    trl = pytest.importorskip("trl")
    from hfqat.integrations.trl import QATSFTTrainer

    rows = _sft_rows()
    args = trl.SFTConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True,
                         report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
                         eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    make = lambda callbacks: QATSFTTrainer(model=_model(tiny_model_dir("llama")), args=args, train_dataset=rows,
                                           eval_dataset=rows.select(range(4)), processing_class=_word_tokenizer(),
                                           callbacks=callbacks)
    with pytest.raises(ValueError, match="exactly one hfqat.QATCallback"):
        make([])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft = make([QATCallback(reallocate_every=0)])
        sft.train()
    assert not [w for w in caught if "compute_loss_func" in str(w.message)]
    logs = [e for e in sft.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(e["distill_loss"] > 0 for e in logs)
    for e in logs:
        assert e["loss"] == pytest.approx(0.5 * e["task_loss"] + 0.5 * e["distill_loss"], rel=1e-4)
    evals = [e["eval_loss"] for e in sft.state.log_history if "eval_loss" in e]
    assert evals and all(math.isfinite(v) for v in evals)
