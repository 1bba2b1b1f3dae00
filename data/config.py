"""Typed configuration of the data pipeline.

Plain dataclasses only (str, int, float, bool, lists, nested dataclasses) because the engine's
YAML loader builds them field by field and rejects unknown keys. No ``from __future__ import
annotations`` here: field types stay real types that such a loader can inspect.
"""
from dataclasses import dataclass, field

SOURCE_KINDS = ("class", "caption")


@dataclass
class SourceConfig:
    """One training source: a set of WebDataset shards and its share of the mixed stream.

    ``shards`` is a brace pattern (``/data/in22k-{000000..004095}.tar``), a single path, several of
    those separated by ``::``, or a ``pipe:`` command. ``kind`` says which label the samples carry:
    ``"class"`` reads ``{key}.cls`` (an integer), ``"caption"`` reads ``{key}.txt`` (or the
    ``caption`` field of ``{key}.json``).

    ``image_keys`` / ``class_keys`` / ``caption_keys``: the member extensions holding the image,
    the class and the caption, first present wins (as open_clip's ``--image-key`` /
    ``--text-key``); a caption key ending in ``json`` is read as JSON and its ``caption`` field
    used. Only these members are read from the shards.
    """

    name: str
    shards: str
    weight: float = 1.0
    kind: str = "class"
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    class_keys: list[str] = field(default_factory=lambda: ["cls"])
    caption_keys: list[str] = field(default_factory=lambda: ["txt", "json"])

    def validate(self) -> None:
        if not self.name:
            raise ValueError("SourceConfig.name is empty: give every training source a name")
        if not self.shards:
            raise ValueError(f"source {self.name!r}: shards is empty; set a path, brace pattern "
                             "or pipe: command")
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source {self.name!r}: kind={self.kind!r} is not one of "
                             f"{SOURCE_KINDS}")
        if not self.weight > 0:
            raise ValueError(f"source {self.name!r}: weight={self.weight} must be > 0")
        for name in ("image_keys", "class_keys", "caption_keys"):
            keys = getattr(self, name)
            if not keys or any(not key or "/" in key or key.startswith(".") for key in keys):
                raise ValueError(f"source {self.name!r}: {name}={keys} must list member "
                                 "extensions without the leading dot, e.g. ['jpg', 'png']")


@dataclass
class DataConfig:
    """Everything the loaders and the device transform need.

    Sizes are pixels, probabilities are in [0, 1]. ``batch_size`` is per rank; ``epoch_samples`` is
    the virtual epoch length summed over all ranks (0: the sample count of the shard indexes).
    """

    train_sources: list[SourceConfig] = field(default_factory=list)
    val_shards: str | None = None
    # Image-text validation pairs (``.txt``/``.json`` captions) for retrieval R@k of the contrastive
    # objective; val_shards are the classified ones (top-1/top-5, zero-shot).
    val_caption_shards: str | None = None
    img_size: int = 224
    batch_size: int = 64
    workers: int = 2
    # Samples per shuffle chunk, per source and worker; memory is about
    # shuffle_buffer x mean sample bytes x sources x workers, and a chunk also ends once it holds
    # shuffle_buffer_mib of member bytes.
    shuffle_buffer: int = 1000
    shuffle_buffer_mib: float = 512.0
    # Largest member read: images in MiB, .cls/.txt/.json in KiB; a sample with a larger one is
    # skipped ("oversized") without reading it. Captions are cut to 64 characters per token of
    # context_length before tokenizing.
    max_image_mib: float = 32.0
    max_text_kib: float = 64.0
    # A pipe: or URL shard that delivers no byte for this long is given up (its process killed)
    # and counted like a cut or unopenable shard.
    read_timeout_s: float = 300.0
    # No batch from the loader workers for this long (a read no timeout covers: a hung filesystem,
    # a stuck decoder) stops the rank with an error naming this key. The first batches fill the
    # shuffle buffers: allow for that. Applies with workers > 0.
    batch_timeout_s: float = 1800.0
    seed: int = 0
    epoch_samples: int = 0
    # RandomResizedCrop: area fraction and aspect-ratio range of the crop.
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    hflip: float = 0.5
    randaugment: bool = True
    randaugment_magnitude: float = 9.0
    randaugment_mstd: float = 0.5
    randaugment_layers: int = 2
    # Colour jitter strength (brightness, contrast, saturation); like timm, it is only used when
    # RandAugment is off, since RandAugment already varies colour.
    color_jitter: float = 0.4
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    # Turn images upright by their EXIF orientation before cropping (train and eval). Off by
    # default, as in PIL, timm and img2dataset (which store the pixels as the camera wrote them);
    # on, an image with an orientation other than 1 is decoded whole (no crop-only decoding).
    exif_transpose: bool = False
    # Eval: resize the short side to img_size / eval_crop_ratio, then centre-crop img_size.
    eval_crop_ratio: float = 0.875
    # Caption tokens per row (start and end included). tokenizer: a vocabulary file, CLIP's BPE
    # merges (*.txt.gz / *.txt) or a HuggingFace tokenizers file (*.json); null: byte-level, one
    # token per byte, which a contrastive run takes only with allow_byte_tokenizer (the demo, tests).
    context_length: int = 77
    tokenizer: str | None = None
    allow_byte_tokenizer: bool = False
    # Pin batches in page-locked memory for asynchronous host-to-GPU copies.
    pin_memory: bool = False
    # A source stops the run with an error naming it when more than this share of its last
    # failure_window samples in one worker failed (judged after 100 samples; 1.0: never).
    max_failure_rate: float = 0.5
    failure_window: int = 1000

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and how to fix it."""
        if not self.train_sources:
            raise ValueError("DataConfig.train_sources is empty: list at least one source "
                             "(name, shards, weight, kind)")
        names = [s.name for s in self.train_sources]
        if len(set(names)) != len(names):
            raise ValueError(f"train source names must be unique, got {names}")
        for source in self.train_sources:
            source.validate()
        _positive(self, "img_size", "batch_size", "context_length")
        _non_negative(self, "workers", "shuffle_buffer", "epoch_samples", "seed")
        _probability(self, "hflip", "reprob", "mixup_prob", "mixup_switch_prob",
                     "max_failure_rate")
        _positive(self, "failure_window", "shuffle_buffer_mib", "max_image_mib", "max_text_kib",
                  "read_timeout_s", "batch_timeout_s")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup={self.mixup} and cutmix={self.cutmix} are Beta alphas and "
                             "must be >= 0 (0 disables)")
        _range_pair(self.crop_scale, "crop_scale", low=0.0, high=1.0)
        _range_pair(self.crop_ratio, "crop_ratio", low=0.0, high=float("inf"))
        if not 0.0 < self.eval_crop_ratio <= 1.0:
            raise ValueError(f"eval_crop_ratio={self.eval_crop_ratio} must be in (0, 1]")
        if not 0.0 <= self.randaugment_magnitude <= 10.0:
            raise ValueError(f"randaugment_magnitude={self.randaugment_magnitude} must be in "
                             "[0, 10]")
        if self.randaugment_mstd < 0 or self.randaugment_layers < 0:
            raise ValueError("randaugment_mstd and randaugment_layers must be >= 0")
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter={self.color_jitter} must be >= 0")


def _positive(cfg: DataConfig, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"DataConfig.{name}={getattr(cfg, name)} must be > 0")


def _non_negative(cfg: DataConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"DataConfig.{name}={getattr(cfg, name)} must be >= 0")


def _probability(cfg: DataConfig, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"DataConfig.{name}={getattr(cfg, name)} is a probability: use a "
                             "value in [0, 1]")


def _range_pair(values: list[float], name: str, low: float, high: float) -> None:
    if len(values) != 2 or not low < values[0] <= values[1] <= high:
        raise ValueError(f"DataConfig.{name}={values} must be [min, max] with "
                         f"{low} < min <= max <= {high}")
