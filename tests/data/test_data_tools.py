"""Command-line tools: the demo data and the shard writer."""
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from internimage.data import SourceConfig, build_eval_loader, build_train_loader, write_demo_data
from internimage.data.demo import DIGIT_NAMES
from internimage.data.faults import SkipCounter
from internimage.data.shards import expand_shards, iter_samples
from internimage.data.write_shards import main as write_shards

from tests.data.data_cases import small_config, take


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    started = time.perf_counter()
    info = write_demo_data(str(out))
    return out, info, time.perf_counter() - started


def test_demo_writes_exactly_the_promised_files(demo):
    out, info, seconds = demo
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    shards = [f"{split}-{i:06d}.tar" for split, n in (("train", 4), ("val", 1)) for i in range(n)]
    expected = [f"{kind}/{name}" for kind in ("captions", "classes")
                for name in shards + ["train-index.json", "val-index.json"]]
    assert files == sorted(expected + ["classes/classes.json", "version.txt"])
    assert info["train_samples"] + info["val_samples"] == 1797 and info["num_classes"] == 10
    assert seconds < 20


def test_demo_shards_hold_digits_with_classes_and_captions(demo):
    out, info, _ = demo
    counter = SkipCounter()
    classes = [s for url in expand_shards(info["classes_train"]) for s in iter_samples(url, counter)]
    captions = [s for url in expand_shards(info["captions_train"]) for s in iter_samples(url, counter)]
    val_captions = [s for url in expand_shards(info["captions_val"]) for s in iter_samples(url, counter)]
    assert len(classes) == len(captions) == info["train_samples"] and len(val_captions) == info["val_samples"]
    assert {int(s.members["cls"]) for s in classes} == set(range(10))
    texts = {s.members["txt"].decode() for s in captions}
    assert "a scan of the handwritten digit seven" in texts and len(texts) > 30
    # Validation: one wording per digit, so identical captions mean the same digit (retrieval).
    assert {s.members["txt"].decode() for s in val_captions} == {
        f"a scan of the handwritten digit {name}" for name in DIGIT_NAMES}
    image = Image.open(__import__("io").BytesIO(classes[0].members["jpg"]))
    assert image.format == "JPEG" and image.size == (64, 64)
    assert json.loads((out / "classes" / "classes.json").read_text())[7] == "seven"


def test_demo_data_feeds_both_loaders(demo):
    _, info, _ = demo
    cfg = small_config([SourceConfig("in22k", info["classes_train"], 0.3, "class"),
                        SourceConfig("laion", info["captions_train"], 0.7, "caption")],
                       val_shards=info["classes_val"], batch_size=32)
    loader = build_train_loader(cfg, 0, 1)
    assert loader.steps_per_epoch == 2 * 1437 // 32
    (batch,) = take(loader, 1)
    assert set(batch["source"].tolist()) == {0, 1}
    assert sum(int(b["valid"].sum()) for b in build_eval_loader(cfg, 0, 1)) == 360


def test_demo_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "internimage.data.demo", "--out",
                             str(tmp_path)], capture_output=True, text=True, check=True)
    assert "classes_train" in result.stdout
    assert (tmp_path / "captions" / "val-000000.tar").is_file()


def test_write_shards_from_an_imagefolder_tree(tmp_path):
    root = tmp_path / "tree"
    for name, fmt in (("cat", "JPEG"), ("dog", "PNG"), ("emu", "BMP")):
        (root / name / "sub").mkdir(parents=True)
        for i in range(3):
            path = root / name / ("sub" if i == 2 else "") / f"img{i}.{fmt.lower()}"
            Image.new("RGB", (20, 10), (i * 50, 0, 0)).save(path, format=fmt)
    (root / "cat" / "notes.txt").write_text("not an image")
    shards = write_shards(["--imagefolder", str(root), "--out", str(tmp_path / "out"),
                           "--max-samples", "4", "--no-shuffle"])
    assert shards == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 1}
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog", "emu"]
    counter = SkipCounter()
    samples = [s for url in expand_shards(str(tmp_path / "out" / "train-{000000..000002}.tar"))
               for s in iter_samples(url, counter)]
    assert [int(s.members["cls"]) for s in samples] == [0] * 3 + [1] * 3 + [2] * 3
    assert [next(e for e in ("jpg", "png") if e in s.members) for s in samples] == \
        ["jpg"] * 3 + ["png"] * 6  # BMP is re-encoded as PNG


def test_write_shards_from_a_caption_list(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "list.tsv").write_text("".join(f"{i}.jpg\ta caption with\ttab {i}\n"
                                               for i in range(3)))
    write_shards(["--list", str(tmp_path / "list.tsv"), "--kind", "caption", "--out",
                  str(tmp_path / "out"), "--prefix", "cc", "--no-shuffle"])
    samples = list(iter_samples(str(tmp_path / "out" / "cc-000000.tar"), SkipCounter()))
    assert [s.members["txt"].decode() for s in samples] == [
        f"a caption with\ttab {i}" for i in range(3)]


def test_write_shards_rejects_a_bad_class_list_line(tmp_path):
    (tmp_path / "list.tsv").write_text("a.jpg\tseven\n")
    with pytest.raises(ValueError, match=r"list.tsv:1: class must be an integer"):
        write_shards(["--list", str(tmp_path / "list.tsv"), "--out", str(tmp_path / "out")])


def test_bench_reports_every_measurement(tmp_path):
    from internimage.data.bench import main as bench

    path = tmp_path / "bench.json"
    result = bench(["--workers", "1", "--images", "4", "--img-size", "32", "--batch-size", "4",
                    "--seconds", "0.05", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    for key in ("baseline", "baseline_cpu_normalise", "loader_1core", "loader_1core_randaugment"):
        assert result[key] > 0, key
    assert result["loader_workers"]["workers"] == 1 and result["loader_workers"]["total"] > 0
    assert result["images"]["mean_kib"] > 1


def test_write_shards_mixes_the_classes_so_batches_see_many(tmp_path):
    """20 classes x 16 images written class after class left a batch of 32 with ~5 distinct
    classes (the loader's chunk shuffle only permutes 64 consecutive samples); seeded shuffled
    writing gives the ~16 that uniform draws give."""
    root = tmp_path / "tree"
    for label in range(20):
        (root / f"c{label:02d}").mkdir(parents=True)
        for i in range(16):
            Image.new("RGB", (4, 4), (label * 12, i * 15, 0)).save(
                root / f"c{label:02d}" / f"{i}.png")
    out = tmp_path / "out"
    write_shards(["--imagefolder", str(root), "--out", str(out), "--max-samples", "64"])
    cfg = small_config([SourceConfig("in22k", str(out / "train-{000000..000004}.tar"))],
                       batch_size=32, shuffle_buffer=64, randaugment=False)
    batches = take(build_train_loader(cfg, 0, 1), 10)
    distinct = [len(set(batch["label"].tolist())) for batch in batches]
    assert sum(distinct) / len(distinct) > 12, distinct

    again = tmp_path / "again"
    write_shards(["--imagefolder", str(root), "--out", str(again), "--max-samples", "64"])
    assert (again / "train-000002.tar").read_bytes() == (out / "train-000002.tar").read_bytes()
