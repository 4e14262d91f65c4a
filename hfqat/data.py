"""Offline text data: prose from the Python standard library (present on every machine), tokenized and packed.

Training text is the language reference in `pydoc_data/topics.py`; evaluation text is the docstrings of
stdlib modules, a different text, so evaluation never sees training data.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

EVAL_MODULES = ("argparse", "logging/__init__", "typing", "dataclasses", "functools", "subprocess", "pathlib",
                "json/__init__", "unittest/case", "collections/__init__")


def stdlib_train_text() -> str:
    """English prose of Python's language reference (pydoc topics), ~460k characters."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def stdlib_eval_text() -> str:
    """Docstrings of several stdlib modules (disjoint from the training text), ~200k characters."""
    lib = Path(importlib.util.find_spec("json").origin).parent.parent
    parts = []
    for module in EVAL_MODULES:
        tree = ast.parse((lib / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    parts.append(doc)
    return "\n\n".join(parts)


def pack_tokens(tokenizer, text: str, block_size: int, max_blocks: int | None = None) -> list[list[int]]:
    """Tokenize `text` once and cut it into consecutive blocks of `block_size` tokens (packing)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return [ids[i * block_size:(i + 1) * block_size] for i in range(n)]
