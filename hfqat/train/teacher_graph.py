"""The teacher's forward replayed as a CUDA graph: one launch instead of the model's Python code on every step.

Why: on a small model the training step waits on the host, not the GPU. SmolLM2-135M on an H200 (8 x 512 tokens,
float32): the eager teacher pass cost 62 ms of host time for 40 ms of GPU work, a replay 0.5 ms
(bench/results/h200_s15_qat_step.md). The teacher is a frozen function of the batch, so its kernels can be recorded
once and replayed. Opt-in (``QATCallback(teacher_cuda_graph=True)``): in the Trainer step the replay did not pay —
231 ms per step against 220 ms eager, as the replayed teacher's 40 ms of kernels no longer overlap its own host
work — while under the profiler's heavier host load it did (277 vs 311 ms).

What makes a replay equal to the eager pass: the graph reads every tensor at the address it had during capture. The
snapshot's weights never move, and the weights it shares with the student (embeddings, norms, head) are updated in
place by the optimizer; each replay first checks that no tensor the teacher reads has moved (`TeacherGraphs` drops its
graphs otherwise) and copies the batch into the captured input buffers. Only plain causal-LM batches are captured:
``input_ids`` and an attention mask without padding (which transformers' mask code would otherwise read on the host,
a sync a capture cannot hold); the mask is then left out, which selects the same causal attention. Anything else
(padding, position ids, embeddings, more inputs) runs eagerly, as does a shape seen once: a graph is captured when a
shape comes back (fixed-length training chunks), at most `MAX_GRAPHS` of them, each holding its own memory pool
(the logits and the pass's temporaries).

The logits a replay returns live in the graph's output buffer: valid until the next teacher call, which is all the
distillation loss needs (it reads them in the same forward). A capture that fails (a model whose forward reads a
tensor on the host, e.g. MoE routing) turns graphs off for the run with one warning; the eager pass goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

MAX_GRAPHS = 2  # distinct batch shapes captured; more (e.g. dynamic padding) run eagerly
GRAPHED_INPUTS = frozenset({"input_ids", "attention_mask"})


def _key(kwargs: dict[str, Any]) -> tuple:
    tensors = tuple(sorted((k, tuple(v.shape), v.dtype, v.device) for k, v in kwargs.items() if torch.is_tensor(v)))
    others = tuple(sorted((k, v) for k, v in kwargs.items() if not torch.is_tensor(v)))
    device = next(v.device.type for v in kwargs.values() if torch.is_tensor(v))
    autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    return tensors, others, autocast


def _uncached_autocast() -> torch.autocast:
    # The surrounding autocast (Trainer's bf16) keeps its state, without its cache of cast weights: a capture must cast
    # the weights itself, not read a cast the student's forward made this step and the next step frees.
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


class TeacherGraphs:
    """Runs ``forward(kwargs) -> logits`` (a no-grad pass) eagerly, or as a CUDA graph replay once the same batch shape
    comes back. ``tensors()``: every tensor the pass reads besides its inputs (a replay requires them unmoved)."""

    def __init__(self, forward: Callable[[dict[str, Any]], torch.Tensor],
                 tensors: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.forward = forward
        self.tensors = tensors
        self.enabled = True
        self._seen: set[tuple] = set()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._addresses: tuple[int, ...] | None = None

    def __call__(self, kwargs: dict[str, Any]) -> torch.Tensor:
        graphed = self._graphable(kwargs) if self.enabled else None
        if graphed is None:
            return self.forward(kwargs)
        key = _key(graphed)
        if self._graphs and self._moved():  # the model was moved or its tensors replaced: recorded addresses are stale
            self._disable("a tensor it reads moved since the capture")
            return self.forward(kwargs)
        if key in self._graphs:
            graph, inputs, logits = self._graphs[key]
            for name, buffer in inputs.items():
                buffer.copy_(graphed[name])
            graph.replay()
            return logits
        if key not in self._seen or len(self._graphs) >= MAX_GRAPHS:
            self._seen.add(key)
            return self.forward(kwargs)
        try:
            with torch.cuda.device(graphed["input_ids"].device):
                return self._capture(key, graphed)
        except Exception as error:  # noqa: BLE001 — any capture failure leaves the eager pass, which is correct
            self._disable(f"its capture failed: {type(error).__name__}: {error}")
            return self.forward(kwargs)

    def _disable(self, why: str) -> None:
        self.enabled = False
        self._graphs.clear()
        logger.warning(f"hfqat: the distillation teacher runs eagerly from now on ({why}); "
                       "QATCallback(teacher_cuda_graph=False) skips CUDA graphs")

    def _graphable(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The inputs to capture (the mask left out), or None when this batch must run eagerly."""
        ids = kwargs.get("input_ids")
        tensors = {k for k, v in kwargs.items() if torch.is_tensor(v)}
        if ids is None or not ids.is_cuda or not tensors <= GRAPHED_INPUTS:
            return None
        if not all(isinstance(v, (bool, int, float, str, type(None))) for k, v in kwargs.items() if k not in tensors):
            return None  # options a key cannot hold (the graph is chosen by them)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):  # one host read, as transformers' own mask code does
            return None
        return {k: v for k, v in kwargs.items() if k != "attention_mask"}

    def _addresses_now(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.tensors())

    def _moved(self) -> bool:
        return self._addresses_now() != self._addresses

    def _capture(self, key: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        inputs = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}
        static = {**kwargs, **inputs}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _uncached_autocast():  # warm-up on a side stream, as capture asks
            self.forward(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _uncached_autocast():
            logits = self.forward(static)
        self._addresses = self._addresses_now()
        self._graphs[key] = (graph, inputs, logits)
        graph.replay()
        return logits
