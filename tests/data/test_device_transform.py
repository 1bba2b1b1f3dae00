"""DeviceTransform: normalisation, random erasing, label smoothing, Mixup/CutMix among class rows
only."""
import numpy as np
import torch

from internimage.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, DeviceTransform, SourceConfig

K = 5


def make_batch(seed=0, rows=8, size=8):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 1, -1, 2, 3, -1, 4, 1][:rows])
    return {"image": images, "label": labels, "text": torch.zeros(rows, 4, dtype=torch.int64),
            "source": (labels < 0).long()}


def config(**overrides):
    values = dict(train_sources=[SourceConfig("x", "x.tar")], label_smoothing=0.1, mixup=0.8,
                  cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, reprob=0.0)
    values.update(overrides)
    return DataConfig(**values)


def reference_normalise(images: torch.Tensor) -> np.ndarray:
    x = images.numpy().astype(np.float64) / 255.0
    return (x - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]


def test_eval_mode_normalises_and_gives_hard_one_hot_targets():
    batch = make_batch()
    out = DeviceTransform(config(), K, eval=True)(batch)
    np.testing.assert_allclose(out["image"].numpy(), reference_normalise(batch["image"]),
                               rtol=1e-5, atol=1e-5)
    expected = np.zeros((8, K))
    for row, label in enumerate(batch["label"].tolist()):
        if label >= 0:
            expected[row, label] = 1.0
    assert out["image"].dtype == torch.float32 and out["target"].dtype == torch.float32
    np.testing.assert_array_equal(out["target"].numpy(), expected)
    assert out["text"] is batch["text"] and out["source"] is batch["source"]


def test_label_smoothing_without_mixing():
    out = DeviceTransform(config(mixup_prob=0.0), K)(make_batch())
    target = out["target"]
    assert torch.allclose(target[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    assert (target[2] == 0).all() and (target[5] == 0).all()


def _lam_of(target_row, label, partner_label, smoothing=0.1):
    """Solve target[label] = lam (1 - s) + s/K for lam (labels differ)."""
    return (target_row[label].item() - smoothing / K) / (1.0 - smoothing)


def test_mixup_mixes_class_rows_with_their_partner_and_leaves_caption_rows_alone():
    batch = make_batch()
    out = DeviceTransform(config(cutmix=0.0), K)(batch, generator=torch.Generator().manual_seed(3))
    plain = torch.from_numpy(reference_normalise(batch["image"])).float()
    class_rows = [0, 1, 3, 4, 6, 7]
    partners = class_rows[::-1]
    labels = batch["label"]
    for row, partner in zip(class_rows, partners):
        if labels[row] == labels[partner]:
            continue
        lam = _lam_of(out["target"][row], labels[row], labels[partner])
        assert 0.0 <= lam <= 1.0
        assert torch.allclose(out["image"][row], lam * plain[row] + (1 - lam) * plain[partner],
                              atol=1e-4)
    for row in (2, 5):
        assert torch.allclose(out["image"][row], plain[row], atol=1e-5)
        assert (out["target"][row] == 0).all()
    assert torch.allclose(out["target"][class_rows].sum(1), torch.ones(6))


def test_cutmix_pastes_a_box_whose_area_matches_the_target_weight():
    batch = make_batch(size=32)
    out = DeviceTransform(config(mixup=0.0), K)(batch, generator=torch.Generator().manual_seed(1))
    plain = torch.from_numpy(reference_normalise(batch["image"])).float()
    row, partner = 0, 7  # labels 0 and 1
    own = torch.isclose(out["image"][row], plain[row], atol=1e-5).all(0)
    pasted = torch.isclose(out["image"][row], plain[partner], atol=1e-5).all(0)
    assert (own | pasted).all()
    lam = _lam_of(out["target"][row], 0, 1)
    assert abs(pasted.float().mean().item() - (1 - lam)) < 0.01


def test_a_seeded_generator_makes_the_transform_reproducible():
    transform = DeviceTransform(config(), K)
    runs = [transform(make_batch(), generator=torch.Generator().manual_seed(seed))["target"]
            for seed in (5, 5, 6, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not all(torch.equal(runs[0], other) for other in runs[2:])
    fixed = DeviceTransform(config(), K, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fixed(make_batch())["target"], runs[0])


def test_random_erasing_fills_one_box_per_chosen_image_with_unit_normal_noise():
    batch = make_batch(rows=8, size=64)
    batch["image"][:] = 128
    transform = DeviceTransform(config(reprob=1.0, mixup_prob=0.0), K)
    out = transform(batch, generator=torch.Generator().manual_seed(0))
    plain = DeviceTransform(config(mixup_prob=0.0), K)(batch, generator=torch.Generator())
    noise = []
    for row in range(8):
        changed = (out["image"][row] != plain["image"][row]).any(dim=0).nonzero()
        rows, cols = changed[:, 0], changed[:, 1]
        height = int(rows.max() - rows.min() + 1)
        width = int(cols.max() - cols.min() + 1)
        assert 0.02 * 64 * 64 * 0.9 <= height * width <= 64 * 64 / 3 * 1.1
        assert len(changed) == height * width  # one filled rectangle
        box = out["image"][row, :, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        noise.append(box.flatten())
    noise = torch.cat(noise)
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05
    assert torch.equal(out["target"], plain["target"])  # erasing leaves the targets alone


def test_random_erasing_rate_follows_reprob_and_is_off_in_eval():
    batch = make_batch(rows=8, size=32)
    erased = 0
    for seed in range(50):
        out = DeviceTransform(config(reprob=0.25, mixup_prob=0.0), K)(
            batch, generator=torch.Generator().manual_seed(seed))
        plain = DeviceTransform(config(mixup_prob=0.0), K)(batch, generator=torch.Generator())
        erased += int((out["image"] != plain["image"]).flatten(1).any(dim=1).sum())
    assert 0.18 < erased / 400 < 0.32
    evaluated = DeviceTransform(config(reprob=1.0), K, eval=True)(batch)
    np.testing.assert_allclose(evaluated["image"].numpy(), reference_normalise(batch["image"]),
                               atol=1e-5)
