"""Offline text data: prose from the Python standard library (present on every machine), tokenized and packed.

Training text is the language reference in `pydoc_data/topics.py`; evaluation text is the docstrings of
stdlib modules, a different text, so evaluation never sees training data. User text comes from local
.txt/.json/.jsonl/.parquet files through `datasets` (`load_blocks`, `load_text`); no network is used.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

EVAL_MODULES = ("argparse", "logging/__init__", "typing", "dataclasses", "functools", "subprocess", "pathlib",
                "json/__init__", "unittest/case", "collections/__init__")
TRAIN_CORPORA = ("reference", "reference+docstrings")


def stdlib_train_text(corpus: str = "reference") -> str:
    """Training prose from the standard library, disjoint from `stdlib_eval_text`.

    ``corpus="reference"``: the language reference (pydoc topics), ~460k characters. ``"reference+docstrings"``:
    that plus the long docstrings of every other stdlib module (not the evaluation modules, not tests), several
    times larger, for runs long enough to repeat the reference many times over.
    """
    from pydoc_data.topics import topics

    if corpus not in TRAIN_CORPORA:
        raise ValueError(f"corpus={corpus!r} is invalid; allowed values: {list(TRAIN_CORPORA)}")
    text = "\n\n".join(topics[key] for key in sorted(topics))
    if corpus == "reference+docstrings":
        lib = _stdlib_dir()
        # Whole packages of the evaluation modules stay out (json/decoder.py repeats json/__init__'s paragraphs).
        excluded = {(lib / module).parent if "/" in module else lib / f"{module}.py" for module in EVAL_MODULES}
        paths = [path for path in sorted(lib.rglob("*.py"))
                 if not excluded & {path, *path.parents}
                 and not {"test", "tests", "site-packages", "idle_test"} & set(path.parts)]
        text += "\n\n" + "\n\n".join(_long_docstrings(paths))
    return text


def stdlib_eval_text() -> str:
    """Docstrings of several stdlib modules (disjoint from the training text), ~100k characters."""
    lib = _stdlib_dir()
    return "\n\n".join(_long_docstrings([lib / f"{module}.py" for module in EVAL_MODULES]))


def _stdlib_dir() -> Path:
    return Path(importlib.util.find_spec("json").origin).parent.parent


def _long_docstrings(paths: Sequence[Path], min_chars: int = 200) -> list[str]:
    parts = []
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # e.g. lib2to3 test data written in Python 2
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > min_chars:
                    parts.append(doc)
    return parts


def pack_tokens(tokenizer, text: str, block_size: int, max_blocks: int | None = None) -> list[list[int]]:
    """Tokenize `text` once and cut it into consecutive blocks of `block_size` tokens (packing)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return [ids[i * block_size:(i + 1) * block_size] for i in range(n)]


# -- local files through `datasets` ------------------------------------------------------------------------
BUILDERS = {".txt": "text", ".md": "text", ".text": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet"}
STDLIB_TEXTS = {"train": stdlib_train_text, "eval": stdlib_eval_text}


def _split_files(files: str | Sequence[str]) -> list[str]:
    return [f.strip() for f in files.split(",") if f.strip()] if isinstance(files, str) else list(files)


def check_data_files(files: str | Sequence[str]) -> tuple[list[str], str]:
    """(paths, `datasets` builder name) of comma-separated or listed data files; raises naming a file that does not
    exist, has an unsupported extension, or is of another format than the others. Cheap: nothing is read."""
    paths = _split_files(files)
    kinds = set()
    for path in paths:
        suffix = Path(path).suffix.lower()
        if suffix not in BUILDERS:
            raise ValueError(f"data file {path!r}: unsupported extension {suffix!r}; allowed: {sorted(BUILDERS)}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file {path!r} does not exist")
        kinds.add(BUILDERS[suffix])
    if len(kinds) > 1:
        raise ValueError(f"data files {paths} mix formats {sorted(kinds)}; pass files of one format")
    return paths, kinds.pop()


def load_documents(files: str | Sequence[str] | None = None, text_column: str = "text", default: str = "train"):
    """A `datasets.Dataset` with one "text" column: the documents of local files, or the stdlib prose.

    `files` are .txt/.md (one document per file), .json/.jsonl or .parquet (one document per row, text in
    `text_column`), comma-separated or a list, all of one kind. Without files: `stdlib_train_text()` for
    `default="train"`, `stdlib_eval_text()` for "eval". Nothing is downloaded.
    """
    import datasets

    if not files:
        return datasets.Dataset.from_dict({"text": [STDLIB_TEXTS[default]()]})
    paths, builder = check_data_files(files)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=paths, split="train", **kwargs)
    if text_column not in ds.column_names:
        raise ValueError(f"data files {paths} have no column {text_column!r}; columns: {ds.column_names} "
                         "(set data.text_column)")
    ds = ds.select_columns([text_column])
    return ds.rename_column(text_column, "text") if text_column != "text" else ds


def tokenize_and_pack(documents, tokenizer, block_size: int, max_blocks: int | None = None):
    """Tokenize every document (EOS between documents when the tokenizer has one), concatenate and cut into
    blocks of `block_size` tokens; returns a `datasets.Dataset` of {"input_ids", "labels"} (labels = inputs;
    the model shifts them), the remainder shorter than a block dropped."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and len(documents) > 1 else []

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]}

    def pack(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = len(ids) // block_size
        blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(n)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names, desc="Tokenizing")
    # One packing batch per 1000 documents: documents join across their boundaries like a single stream.
    packed = tokenized.map(pack, batched=True, batch_size=1000, desc="Packing")
    if len(packed) == 0:
        raise ValueError(f"the text has fewer than block_size={block_size} tokens; lower data.block_size")
    if max_blocks is not None:
        packed = packed.select(range(min(max_blocks, len(packed))))
    return packed.with_format("torch")


def load_blocks(tokenizer, files: str | Sequence[str] | None, block_size: int, max_blocks: int | None = None,
                text_column: str = "text", default: str = "train"):
    """`tokenize_and_pack(load_documents(...))`: packed token blocks ready for `transformers.Trainer`."""
    return tokenize_and_pack(load_documents(files, text_column, default), tokenizer, block_size, max_blocks)


def load_text(files: str | Sequence[str] | None = None, text_column: str = "text", default: str = "eval") -> str:
    """All documents as one string (documents joined by blank lines): the input of perplexity evaluation."""
    return "\n\n".join(load_documents(files, text_column, default)["text"])
