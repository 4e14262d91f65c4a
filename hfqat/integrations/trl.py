"""`QATSFTTrainer`: trl's ``SFTTrainer`` training on `QATCallback`'s distillation loss.

SFTTrainer computes its training loss from a fused LM head (per-token log-probabilities, never the full logits),
which distillation needs. Its ``compute_loss_func`` hook is deprecated in trl and runs a second forward pass per
step; this subclass overrides ``compute_loss`` instead, as trl recommends: on training steps one forward with full
logits and the callback's ``(1 - α) · task + α · T² · KL`` mix; evaluation is SFTTrainer's own. Training-step
metrics that SFTTrainer derives from its fused head (entropy, token accuracy) are not logged; ``task_loss`` and
``distill_loss`` are. Needs ``pip install trl``::

    from hfqat.integrations.trl import QATSFTTrainer
    trainer = QATSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, callbacks=[hfqat.QATCallback()])
"""

from __future__ import annotations

from typing import Any

try:
    from trl import SFTTrainer
except ImportError as error:  # an optional dependency: say what to install
    raise ImportError("hfqat.integrations.trl needs trl: pip install trl") from error

from ..train.callback import QATCallback


class QATSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose training loss is the `QATCallback` mix; ``callbacks`` must hold one `QATCallback`."""

    def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
        qat = [cb for cb in callbacks or [] if isinstance(cb, QATCallback)]
        if len(qat) != 1:
            raise ValueError(f"QATSFTTrainer: callbacks must hold exactly one hfqat.QATCallback; got {len(qat)}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("QATSFTTrainer: compute_loss_func is not allowed (the QATCallback provides the loss)")
        self._qat_loss = qat[0].make_compute_loss_func()
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        loss = self._qat_loss(outputs, inputs.get("labels"), num_items_in_batch=num_items_in_batch)
        # as SFTTrainer and Trainer do: num_items_in_batch counts every rank's tokens, DDP averages gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
