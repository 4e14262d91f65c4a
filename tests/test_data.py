"""Offline text data: the stdlib training and evaluation texts stay disjoint; packing cuts consecutive blocks."""

import pytest

from hfqat.cli.data import (
    TRAIN_CORPORA,
    pack_tokens,
    stdlib_eval_text,
    stdlib_train_text,
)


def _paragraphs(text: str) -> set[str]:
    return {p for p in text.split("\n\n") if len(p) > 40}  # "Usage:"-like headers may repeat anywhere


@pytest.fixture(scope="module")
def texts():
    return {"eval": stdlib_eval_text(), **{corpus: stdlib_train_text(corpus) for corpus in TRAIN_CORPORA}}


def test_training_texts_never_contain_evaluation_text(texts):
    evaluation = _paragraphs(texts["eval"])
    assert len(texts["eval"]) > 50_000
    for corpus in TRAIN_CORPORA:
        assert not evaluation & _paragraphs(texts[corpus]), corpus
    assert texts["reference+docstrings"].startswith(texts["reference"])
    assert len(texts["reference+docstrings"]) > 3 * len(texts["reference"])


def test_unknown_corpus_names_the_field():
    with pytest.raises(ValueError, match=r"corpus='docs' is invalid; allowed values"):
        stdlib_train_text("docs")


def test_pack_tokens_cuts_consecutive_blocks():
    def tokenizer(text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}

    assert pack_tokens(tokenizer, "abcdefghij", 3) == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert pack_tokens(tokenizer, "abcdefghij", 3, max_blocks=1) == [[97, 98, 99]]
