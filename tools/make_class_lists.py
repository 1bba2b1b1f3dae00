"""Writes the shipped class-name lists of zero-shot evaluation (data/class_lists/*.txt).

    pip download timm --no-deps -d /tmp/timm && python tools/make_class_lists.py /tmp/timm/timm-*.whl

Sources: the public WordNet synset lists and synset → lemma map that timm's wheel ships as package
data (``timm/data/_info/``, Apache-2.0): ``imagenet_synsets.txt`` (the 1,000 ImageNet-1K synsets
in their usual sorted order), ``imagenet22k_synsets.txt`` (the 21,841 synsets of ImageNet-22K,
fall11, sorted: the order of the 21841-class heads of InternImage, Swin and BEiT) and
``imagenet_synset_to_lemma.txt`` (``synset<TAB>lemma, lemma, ...``). The wheel is read as a zip
file; timm is neither imported nor installed. The demo list is the demo's own digit names.

Output format (data/class_names.py): line i holds class i's names, synonyms separated by ", ".
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile

INFO = "timm/data/_info/"
LISTS = {"imagenet1k": ("imagenet_synsets.txt", 1000), "imagenet22k": ("imagenet22k_synsets.txt", 21841)}
OUT_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "class_lists"))


def _lines(wheel: zipfile.ZipFile, name: str) -> list[str]:
    return wheel.read(INFO + name).decode("utf-8").splitlines()


def class_lists(wheel_path: str) -> dict[str, list[str]]:
    """{list name: one line per class, "lemma, lemma, ..."} from timm's wheel."""
    with zipfile.ZipFile(wheel_path) as wheel:
        lemmas = dict(line.split("\t", 1) for line in _lines(wheel, "imagenet_synset_to_lemma.txt"))
        out = {}
        for name, (synset_file, expected) in LISTS.items():
            synsets = [s for s in _lines(wheel, synset_file) if s]
            if len(synsets) != expected:
                raise SystemExit(f"{synset_file}: {len(synsets)} synsets, expected {expected}")
            out[name] = [" ".join(lemmas[s].split()) for s in synsets]
    return out


def write(name: str, lines: list[str]) -> str:
    path = os.path.join(OUT_DIR, f"{name}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", help="timm-*.whl (pip download timm --no-deps -d DIR)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(OUT_DIR, "..", ".."))
    from internimage.data.demo import DIGIT_NAMES
    lists = {"demo": list(DIGIT_NAMES), **class_lists(args.wheel)}
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, lines in lists.items():
        print(f"{write(name, lines)}: {len(lines)} classes")


if __name__ == "__main__":
    main()
