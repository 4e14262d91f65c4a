"""`CheckpointStore`: what a checkpoint holds of `QATCallback`'s state, and where a resumed run reads it back.

A checkpoint folder holds, besides the model (per-layer bits, per-row widths, scales, float weights):

- in ``trainer_state.json`` (Trainer's ``stateful_callbacks``): the callback's settings and `saved_state` — the
  allocation history, the per-layer sensitivity EMAs and clip ratios, and for MoE models the per-expert scores,
  their open window and routing baselines;
- ``hfqat_teacher.safetensors``: the snapshot teacher's train-start float weights;
- ``hfqat_sensitivity.safetensors``: per-row sensitivity EMAs (too large for JSON).

A resumed run reads the files from the checkpoint it resumes, never from a path recorded at save time (a copied
or moved run reads its own files). A file that is there but cannot be read, or does not fit the model, raises a
`ValueError` naming it; a missing one is reported and the state starts afresh.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..distributed import broadcast_object, is_main_process

logger = logging.getLogger(__name__)

TEACHER_FILE = "hfqat_teacher.safetensors"
ROW_SCORES_FILE = "hfqat_sensitivity.safetensors"
STATE_VERSION = 1


def read_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; a damaged file raises a `ValueError` naming it and what it holds."""
    try:
        return load_file(os.fspath(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) naming no file
        raise ValueError(f"QATCallback: cannot read the {what} {os.fspath(path)!r} of the checkpoint being resumed "
                         f"({type(err).__name__}: {err}); restore the file, delete it to start that state afresh, or "
                         f"resume from another checkpoint") from err


def resumed_checkpoint(args: Any, state: Any) -> str | None:
    """The folder a run resumes from. Trainer does not hand it to callbacks, so: ``resume_from_checkpoint`` of the
    Trainer training loop that called us (``trainer.train(resume_from_checkpoint=...)``, True already resolved), else
    ``args.resume_from_checkpoint``, else ``output_dir/checkpoint-<global step>`` (Trainer's naming); None when
    not resuming."""
    if state.global_step <= 0:
        return None
    frame = sys._getframe(1)
    while frame is not None:  # read once per train start; transformers' Trainer._inner_training_loop (5.x)
        if frame.f_code.co_name == "_inner_training_loop" and \
                frame.f_globals.get("__name__", "").startswith("transformers."):
            path = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(path, (str, os.PathLike)):
                return os.fspath(path)
            break
        frame = frame.f_back
    del frame
    if isinstance(getattr(args, "resume_from_checkpoint", None), (str, os.PathLike)):
        return os.fspath(args.resume_from_checkpoint)
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


class CheckpointStore:
    """Writes the callback's files into each checkpoint and reads them from the one being resumed."""

    def __init__(self, callback_name: str) -> None:
        self.callback_name = callback_name
        self.resumed: str | None = None  # the checkpoint folder this run resumed from

    # -- trainer_state.json -----------------------------------------------------------------------------------
    @staticmethod
    def state_record(args: Mapping[str, Any], history: list[dict[str, Any]], budget: float | None,
                     estimator: Mapping[str, Any]) -> dict[str, Any]:
        """The ``ExportableState.state()`` of the callback."""
        saved = {"version": STATE_VERSION, "history": history, "budget": budget, "estimator": dict(estimator)}
        return {"args": dict(args), "attributes": {"_saved_state": saved}}

    def saved_state(self, args: Any, state: Any) -> dict[str, Any] | None:
        """The callback's saved state in the resumed checkpoint's trainer_state.json (None when not resuming or when
        it holds none of this version); also finds the checkpoint folder (`resumed`)."""
        self.resumed = resumed_checkpoint(args, state)
        if self.resumed is None:
            return None
        data = (state.stateful_callbacks or {}).get(self.callback_name)
        if isinstance(data, list):
            data = data[0] if data else None
        saved = (data or {}).get("attributes", {}).get("_saved_state")
        if not (saved and saved.get("version") == STATE_VERSION):
            logger.warning("QATCallback: resuming without saved QATCallback state; starting its state afresh.")
            return None
        return saved

    # -- files ------------------------------------------------------------------------------------------------
    def _resumed_file(self, filename: str, afresh: str) -> str | None:
        path = os.path.join(self.resumed, filename) if self.resumed is not None else None
        if path is None or not os.path.isfile(path):
            logger.warning("QATCallback: %s not found in the resumed checkpoint %s; %s.", filename, self.resumed,
                           afresh)
            return None
        return path

    def teacher_file(self) -> str | None:
        """The snapshot teacher's file in the resumed checkpoint, or None (reported)."""
        return self._resumed_file(TEACHER_FILE, "the resumed run distills from a snapshot of the resumed (already "
                                                "trained) weights instead of the original ones")

    def load_row_scores(self, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor] | None:
        """Per-row EMAs from the resumed checkpoint, checked against ``shapes`` (layer → (bits, out)); None
        (reported) when the file is missing."""
        path = self._resumed_file(ROW_SCORES_FILE, "per-row sensitivities start afresh")
        if path is None:
            return None
        scores = read_safetensors(path, "per-row sensitivities")
        wrong = [name for name, shape in shapes.items() if name in scores and scores[name].shape != shape]
        if wrong:
            raise ValueError(f"QATCallback: the per-row sensitivities {path!r} do not fit this model: {wrong[0]} has "
                             f"shape {tuple(scores[wrong[0]].shape)}, allowed {tuple(shapes[wrong[0]])} "
                             f"(bit choices x rows); resume with the same model and bit_choices")
        return scores

    @staticmethod
    def save(checkpoint: str, teacher: Any, row_scores: Mapping[str, torch.Tensor]) -> None:
        """Write the teacher snapshot (an object with ``save(path)``, or None) and per-row EMAs into ``checkpoint``.
        Every rank calls it (a sharded snapshot is gathered); rank 0 decides whether the folder exists and writes."""
        if not broadcast_object(os.path.isdir(checkpoint)):
            return
        if teacher is not None:
            teacher.save(os.path.join(checkpoint, TEACHER_FILE))
        if row_scores and is_main_process():
            path = os.path.join(checkpoint, ROW_SCORES_FILE)
            save_file({name: t.contiguous() for name, t in row_scores.items()}, path + ".tmp")
            os.replace(path + ".tmp", path)
