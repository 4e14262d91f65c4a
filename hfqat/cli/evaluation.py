"""Offline evaluation: sliding-window perplexity on held-out text and zero-shot multiple-choice scoring.

Perplexity
    `perplexity` scores every token of the text exactly once. Windows of `window` tokens start every `stride`
    tokens; each window scores only the tokens the previous window did not (its last ``end - prev_end``), so
    every scored token sees at least ``window - stride`` tokens of context. With ``window >= len(text)`` it is
    the plain full-sequence perplexity. Token log-probabilities are summed in float32 and divided once.

Multiple choice (zero-shot)
    Each question becomes the prompt ``"Question: {question}\\nAnswer:"``; each choice is scored by the summed
    log-likelihood of ``" " + choice`` after it. ``acc`` takes the best sum, ``acc_norm`` the best sum per
    character of the choice. These are exactly lm-evaluation-harness' ``multiple_choice`` metrics and its
    context/continuation tokenization, so both backends agree (tested when lm-eval is installed).

Why two backends
    lm-evaluation-harness (PyPI ``lm-eval``) *does* run offline on our model object: its ``HFLM`` wrapper accepts
    an already-built model, and a task YAML with ``dataset_path: json`` and local ``data_files`` loads without a
    download (checked with lm-eval 0.4.13). It is the tool users know, so ``backend="lm-eval"`` (and "auto"
    when it is installed) drives it with a generated task file. But it pulls ~37 packages (scipy, scikit-learn,
    nltk, sacrebleu, lxml, ...), too heavy for the demo's one-line install, so it is the optional extra
    ``hfqat[eval]`` and the small built-in scorer (same metrics) is the fallback.
    Hugging Face ``evaluate`` is not used: its metrics are scripts fetched from the Hub on first use (and its
    "perplexity" metric loads a model by Hub id), which does not fit an offline run.

Task files are JSON (a list) or JSONL of ``{"question": str, "choices": [str, ...], "answer": int}``; the
bundled `DEFAULT_MC_TASK` has 40 questions on Python semantics (written for hfqat).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

DEFAULT_MC_TASK = Path(__file__).resolve().parent / "tasks" / "python_semantics.jsonl"
MC_PROMPT = "Question: {question}\nAnswer:"
MC_DELIMITER = " "


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- perplexity --------------------------------------------------------------------------------------------
def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; together they score positions 1..n_tokens-1 once."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"perplexity window={window}, stride={stride} are invalid; allowed: window >= 2 and "
                         "1 <= stride <= window")
    windows, prev_end, start = [], 0, 0
    while prev_end < n_tokens:
        first = max(prev_end, 1)
        # The first scored token is predicted from its predecessor, which must be inside the window (with
        # stride == window a window would otherwise start on a token nothing predicts).
        begin = min(start, first - 1)
        end = min(begin + window, n_tokens)
        windows.append((begin, end, first))
        prev_end, start = end, start + stride
    return windows


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor, window: int, stride: int | None = None,
              batch_size: int = 4, progress: bool = False, desc: str = "Perplexity") -> tuple[float, int]:
    """(summed negative log-likelihood, number of scored tokens) of a 1-D token sequence, sliding window."""
    stride = stride or max(1, window // 2)
    ids = input_ids.reshape(-1)
    windows = sliding_windows(len(ids), window, stride)
    device, was_training = _device(model), model.training
    model.eval()
    total, count = 0.0, 0
    # Windows of equal length batch together (all but possibly the last).
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] - batches[-1][0][0] == w[1] - w[0]:
            batches[-1].append(w)
        else:
            batches.append([w])
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
            for row, (b, _, first) in enumerate(batch):
                scored = logp[row, first - b - 1:]  # logp[:, j] predicts token b + j + 1
                total -= scored.sum().item()
                count += scored.numel()
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, tokenizer, text: str, *, window: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = True,
               desc: str = "Perplexity") -> dict[str, float]:
    """Sliding-window perplexity of `text` (its first `max_tokens` tokens) under `model`.

    Returns {"ppl", "nll" (mean per token), "tokens" (scored), "window", "stride"}.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("perplexity needs a text of at least 2 tokens")
    stride = stride or max(1, window // 2)
    nll, count = token_nll(model, ids, window, stride, batch_size, progress, desc)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "window": window, "stride": stride}


# -- multiple choice ---------------------------------------------------------------------------------------
def load_mc_task(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Questions of a JSON/JSONL multiple-choice file, checked: question (str), choices (list), answer (index)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]
    for i, row in enumerate(rows):
        ok = (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("choices"), list)
              and len(row["choices"]) >= 2 and isinstance(row.get("answer"), int)
              and 0 <= row["answer"] < len(row["choices"]))
        if not ok:
            raise ValueError(f"{path}: item {i} must be {{'question': str, 'choices': [>= 2 str], 'answer': index}}, "
                             f"got {row!r}")
    return rows


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """As lm-evaluation-harness: trailing context spaces move to the continuation; split the joint encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(ctx)], whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8,
                   progress: bool = False) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation) pair."""
    device, was_training = _device(model), model.training
    model.eval()
    encoded = [_encode_pair(tokenizer, c, x) for c, x in requests]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    try:
        for start in tqdm(range(0, len(encoded), batch_size), desc="Multiple choice", disable=not progress,
                          leave=False):
            chunk = encoded[start:start + batch_size]
            seqs = [ctx + cont for ctx, cont in chunk]
            length = max(map(len, seqs))
            x = torch.full((len(seqs), length), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for i, seq in enumerate(seqs):  # right padding: positions of real tokens are unchanged
                x[i, :len(seq)] = torch.tensor(seq)
                mask[i, :len(seq)] = 1
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            for i, (ctx, cont) in enumerate(chunk):
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logp.device)
                out.append(logp[i, pos, torch.tensor(cont, device=logp.device)].sum().item())
    finally:
        model.train(was_training)
    return out


def score_multiple_choice(model: nn.Module, tokenizer, questions: Sequence[dict[str, Any]], batch_size: int = 8,
                          progress: bool = False) -> dict[str, float]:
    """Built-in scorer: {"acc", "acc_norm", "n"} over `questions` (see the module docstring)."""
    requests = [(MC_PROMPT.format(question=q["question"]), MC_DELIMITER + str(c)) for q in questions
                for c in q["choices"]]
    lls = loglikelihoods(model, tokenizer, requests, batch_size, progress)
    acc = acc_norm = 0
    i = 0
    for q in questions:
        scores = lls[i:i + len(q["choices"])]
        i += len(q["choices"])
        lengths = [len(str(c)) for c in q["choices"]]
        acc += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
        acc_norm += max(range(len(scores)), key=lambda j: scores[j] / lengths[j]) == q["answer"]
    n = len(questions)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


LM_EVAL_TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _as_jsonl(path: Path, folder: Path) -> Path:
    """lm-eval's json loader wants one record per line; convert a JSON list once, validated."""
    rows = load_mc_task(path)
    out = folder / f"{path.stem}.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return out


def score_with_lm_eval(model: nn.Module, tokenizer, task_files: Sequence[str | os.PathLike], batch_size: int = 8,
                       limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness on the model object with generated task YAMLs over local files (offline)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="hfqat-lm-eval-") as tmp:
        folder, names = Path(tmp), {}
        for path in map(Path, task_files):
            name = f"hfqat_{path.stem}".replace("-", "_")
            (folder / f"{name}.yaml").write_text(LM_EVAL_TASK_TEMPLATE.format(
                name=name, path=json.dumps(str(_as_jsonl(path, folder))), delimiter=MC_DELIMITER))
            names[name] = path.stem
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        result = lm_eval.simple_evaluate(model=lm, tasks=list(names), limit=limit, log_samples=False,
                                         task_manager=TaskManager(include_path=str(folder)))
    return {stem: {"acc": result["results"][name]["acc,none"], "acc_norm": result["results"][name]["acc_norm,none"],
                   "n": result["n-samples"][name]["effective"]} for name, stem in names.items()}


def multiple_choice(model: nn.Module, tokenizer, task_files: Sequence[str | os.PathLike] | None = None,
                    backend: str = "auto", batch_size: int = 8, progress: bool = True) -> dict[str, dict[str, float]]:
    """Zero-shot multiple-choice accuracy per task file: {task name: {"acc", "acc_norm", "n"}}.

    backend: "builtin", "lm-eval" (error if not installed) or "auto" (lm-eval when installed).
    """
    files = [Path(f) for f in (task_files or [DEFAULT_MC_TASK])]
    if backend not in ("auto", "builtin", "lm-eval"):
        raise ValueError(f"multiple_choice backend={backend!r} is invalid; allowed: ['auto', 'builtin', 'lm-eval']")
    if backend == "lm-eval" and not lm_eval_available():
        raise ImportError("backend='lm-eval' needs lm-evaluation-harness: pip install 'hfqat[eval]' (or lm-eval)")
    if backend == "lm-eval" or (backend == "auto" and lm_eval_available()):
        return score_with_lm_eval(model, tokenizer, files, batch_size)
    return {f.stem: score_multiple_choice(model, tokenizer, load_mc_task(f), batch_size, progress) for f in files}
