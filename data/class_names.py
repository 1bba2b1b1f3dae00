"""Class-name lists for zero-shot classification: one plain-text format, three shipped lists.

Format (UTF-8): line i holds the names of class i (the integer in a sample's ``.cls``); several
synonyms on one line are separated by ", " and the **first** is the class's name in the prompts
(the others stay for people reading the file: WordNet's later lemmas are often Latin or rarer
words, which would pull an average of all of them off the common name). Every line must hold a
name; a final newline is optional. Shipped (``data/class_lists/``, package data): ``demo`` (the
demo's ten digits), ``imagenet1k`` (1,000) and ``imagenet22k`` (21,841, fall11 sorted order),
generated from public WordNet lists by ``tools/make_class_lists.py``.
"""
from __future__ import annotations

import os

__all__ = ["SHIPPED_CLASS_LISTS", "class_names_path", "load_class_names"]

LISTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "class_lists")
SHIPPED_CLASS_LISTS = ("demo", "imagenet1k", "imagenet22k")
SYNONYM_SEPARATOR = ", "


def class_names_path(spec: str) -> str:
    """The file of ``spec``: a shipped list's name or a path to a file in the format above."""
    if spec in SHIPPED_CLASS_LISTS:
        return os.path.join(LISTS_DIR, f"{spec}.txt")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"class names {spec!r}: no such file, and not a shipped list "
                                f"({', '.join(SHIPPED_CLASS_LISTS)}); give a path to a text file with "
                                "one class name per line (line i = class i)")
    return spec


def load_class_names(spec: str) -> list[str]:
    """The name of every class (index = class id) of a shipped list or a file; ValueError names
    the first empty line."""
    path = class_names_path(spec)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"class names file {path} is empty; write one class name per line")
    names = []
    for number, line in enumerate(lines, start=1):
        name = line.split(SYNONYM_SEPARATOR)[0].strip()
        if not name:
            raise ValueError(f"class names file {path}, line {number} (class {number - 1}) holds no "
                             "name; every line must name its class")
        names.append(name)
    return names
