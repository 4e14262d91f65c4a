"""The teacher pass as a CUDA graph (`hfqat.train.teacher_graph`): replays equal the eager pass while the shared
weights train, batches it cannot replay run eagerly, a moved tensor or a failed capture falls back with a warning,
and a Trainer run with the graphed teacher trains like one with the eager teacher. CPU checks first."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, text_dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hfqat
from hfqat.quant.modeling import qat_layers
from hfqat.train.arguments import CallbackArguments
from hfqat.train.distillation import ModelTeacher, SnapshotTeacher

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _student(path, device="cpu"):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfqat.QATConfig(bits=2, group_size=32))
    return model.to(device)


def test_teacher_cuda_graph_setting_is_validated_and_saved():
    with pytest.raises(ValueError, match="teacher_cuda_graph.*True or False"):
        CallbackArguments(teacher_cuda_graph="yes")
    assert CallbackArguments().saved_arguments()["teacher_cuda_graph"] is False
    assert CallbackArguments(teacher_cuda_graph=True).saved_arguments()["teacher_cuda_graph"] is True


def test_no_graphs_off_the_gpu(tiny_model_dir, input_ids):
    student = _student(tiny_model_dir("llama"))
    assert SnapshotTeacher(student, cuda_graph=True).graphs is None
    assert ModelTeacher(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")), cuda_graph=True).graphs is None


def _ids(seed, rows=2, cols=24):
    return torch.randint(0, VOCAB, (rows, cols), generator=torch.Generator().manual_seed(seed)).cuda()


@cuda
def test_replays_equal_the_eager_pass_while_shared_weights_train(tiny_model_dir):
    student = _student(tiny_model_dir("llama"), "cuda")
    graphed, eager = SnapshotTeacher(student, cuda_graph=True), SnapshotTeacher(student)
    for step in range(4):
        ids = _ids(step)
        mask = torch.ones_like(ids)
        logits = graphed.logits((), {"input_ids": ids, "attention_mask": mask, "use_cache": False})
        expected = eager.logits((), {"input_ids": ids, "attention_mask": mask, "use_cache": False})
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the optimizer trains the shared embeddings in place; the snapshot stays
            student.get_input_embeddings().weight.add_(0.01)
            for _, layer in qat_layers(student):
                layer.weight.add_(0.01)
    assert len(graphed.graphs._graphs) == 1  # captured on the shape's second sighting, replayed since


@cuda
def test_batches_a_graph_cannot_replay_run_eagerly(tiny_model_dir):
    student = _student(tiny_model_dir("llama"), "cuda")
    graphed, eager = SnapshotTeacher(student, cuda_graph=True), SnapshotTeacher(student)
    ids = _ids(0)
    padded = torch.ones_like(ids)
    padded[1, 20:] = 0
    positions = torch.arange(ids.shape[1], device="cuda").expand_as(ids)
    for kwargs in ({"input_ids": ids, "attention_mask": padded}, {"input_ids": ids, "position_ids": positions}):
        for _ in range(3):
            torch.testing.assert_close(graphed.logits((), kwargs), eager.logits((), kwargs), rtol=1e-5, atol=1e-5)
    assert not graphed.graphs._graphs


@cuda
def test_a_moved_tensor_turns_graphs_off_with_a_warning(tiny_model_dir, caplog):
    student = _student(tiny_model_dir("llama"), "cuda")
    teacher = SnapshotTeacher(student, cuda_graph=True)
    ids = _ids(0)
    for _ in range(2):
        teacher.logits((), {"input_ids": ids})
    assert teacher.graphs._graphs
    norm = student.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2)  # replaced, not updated in place
    with caplog.at_level("WARNING"):
        logits = teacher.logits((), {"input_ids": ids})
    assert "runs eagerly" in caplog.text and not teacher.graphs.enabled
    torch.testing.assert_close(logits, SnapshotTeacher(student).logits((), {"input_ids": ids}))


@cuda
def test_a_failed_capture_falls_back_to_the_eager_pass(tiny_model_dir, caplog):
    student = _student(tiny_model_dir("llama"), "cuda")
    teacher = SnapshotTeacher(student, cuda_graph=True)
    calls = []

    def host_read(module, args, output):  # a forward that reads a tensor on the host cannot be captured
        calls.append(float(output.float().mean()))

    student.model.norm.register_forward_hook(host_read)
    ids = _ids(0)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            logits = teacher.logits((), {"input_ids": ids})
    assert "capture failed" in caplog.text and not teacher.graphs.enabled
    torch.testing.assert_close(logits, SnapshotTeacher(student).logits((), {"input_ids": ids}))


class GraphCount(TrainerCallback):
    """Records, after each step, how many graphs the QATCallback's teacher holds (None: eager)."""

    def __init__(self, callback):
        self.callback, self.graphs = callback, []

    def on_step_end(self, args, state, control, **kwargs):
        graphs = self.callback._hook.teacher.graphs
        self.graphs.append(None if graphs is None else len(graphs._graphs))


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_run_with_the_graphed_teacher_trains_like_the_eager_one(tiny_model_dir, tmp_path, bf16):
    losses = {}
    for graph in (True, False):
        model = _student(tiny_model_dir("llama"))
        args = TrainingArguments(str(tmp_path / str(graph)), max_steps=6, per_device_train_batch_size=4,
                                 logging_steps=1, save_strategy="no", report_to=[], learning_rate=1e-3,
                                 disable_tqdm=True, seed=0, bf16=bf16)
        callback = hfqat.QATCallback(budget_bits=None, reallocate_every=0, write_plots=False,
                                     teacher_cuda_graph=graph)
        replays = GraphCount(callback)
        trainer = Trainer(model=model, args=args, train_dataset=text_dataset(24), callbacks=[callback, replays])
        trainer.train()
        losses[graph] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert replays.graphs[-1] == (1 if graph else None)  # the graphed run replayed its teacher
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-3 if bf16 else 1e-4, atol=1e-5)
