"""Offline evaluation: sliding-window perplexity and multiple-choice scoring, checked against direct computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hfqat.cli.evaluation import (
    DEFAULT_MC_TASK,
    MC_DELIMITER,
    MC_PROMPT,
    load_mc_task,
    multiple_choice,
    score_multiple_choice,
    sliding_windows,
    token_nll,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with exactly 256 tokens (the tiny test models' vocabulary), no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (10, 4, 4), (10, 4, 1), (7, 16, 8), (33, 8, 3), (2, 2, 1)])
def test_sliding_windows_score_every_position_once(n, window, stride):
    scored = [p for begin, end, first in sliding_windows(n, window, stride) for p in range(first, end)]
    assert sorted(scored) == list(range(1, n))
    assert all(end - begin <= window for begin, end, _ in sliding_windows(n, window, stride))


@pytest.mark.parametrize("window,stride", [(1, 1), (4, 0), (4, 5)])
def test_bad_window_names_the_fields(window, stride):
    with pytest.raises(ValueError, match="window"):
        sliding_windows(10, window, stride)


def test_full_window_perplexity_equals_plain_cross_entropy(model):
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(0))
    nll, count = token_nll(model, ids, window=128)
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
    expected = F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()
    assert count == 59
    assert nll == pytest.approx(expected, rel=1e-5)
    windowed, windowed_count = token_nll(model, ids, window=16, stride=8)
    assert windowed_count == 59 and math.isfinite(windowed)
    assert windowed / windowed_count == pytest.approx(nll / count, rel=0.2)  # less context, similar on a random model


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(context + continuation, add_special_tokens=False).input_ids[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def _task(model, tokenizer, tmp_path, pick) -> tuple:
    questions = [{"question": q, "choices": c} for q, c in [
        ("What is 2 + 2?", ["four", "five", "x"]), ("Pick a colour", ["red", "blue"]),
        ("Which keyword defines a function?", ["def", "lambda", "class", "fn"])]]
    for q in questions:
        lls = [_direct_loglikelihood(model, tokenizer, MC_PROMPT.format(question=q["question"]), MC_DELIMITER + c)
               for c in q["choices"]]
        q["answer"] = pick(range(len(lls)), key=lls.__getitem__)
    path = tmp_path / f"task_{pick.__name__}.json"
    path.write_text(json.dumps(questions))
    return questions, path


def test_builtin_scorer_agrees_with_direct_loglikelihoods(model, tmp_path):
    tokenizer = byte_tokenizer()
    best, _ = _task(model, tokenizer, tmp_path, max)
    worst, _ = _task(model, tokenizer, tmp_path, min)
    assert score_multiple_choice(model, tokenizer, best, batch_size=2)["acc"] == 1.0
    assert score_multiple_choice(model, tokenizer, worst, batch_size=2)["acc"] == 0.0


def test_bundled_task_loads_and_scores(model):
    questions = load_mc_task(DEFAULT_MC_TASK)
    assert len(questions) == 40 and all(0 <= q["answer"] < len(q["choices"]) for q in questions)
    result = multiple_choice(model, byte_tokenizer(), backend="builtin", progress=False)
    (scores,) = result.values()
    assert scores["n"] == 40 and 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["acc_norm"] <= 1.0


@pytest.mark.parametrize("record", [{"question": "q", "choices": ["a"], "answer": 0},
                                    {"question": "q", "choices": ["a", "b"], "answer": 2},
                                    {"choices": ["a", "b"], "answer": 0}])
def test_bad_task_records_are_named(tmp_path, record):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match="item 0"):
        load_mc_task(path)


def test_bad_backend_is_named(model):
    with pytest.raises(ValueError, match="backend"):
        multiple_choice(model, byte_tokenizer(), backend="harness")


def test_lm_eval_backend_matches_builtin(model, tmp_path):
    pytest.importorskip("lm_eval")
    tokenizer = byte_tokenizer()
    questions, path = _task(model, tokenizer, tmp_path, max)
    questions[1]["answer"] = 1 - questions[1]["answer"]  # one wrong answer: acc 2/3 on both sides
    path.write_text(json.dumps(questions))
    builtin = multiple_choice(model, tokenizer, [path], backend="builtin", progress=False)
    harness = multiple_choice(model, tokenizer, [path], backend="lm-eval", batch_size=2)
    assert builtin[path.stem]["acc"] == pytest.approx(2 / 3)
    for metric in ("acc", "acc_norm"):
        assert harness[path.stem][metric] == pytest.approx(builtin[path.stem][metric])
