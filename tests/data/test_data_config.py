"""DataConfig validation names the bad field and the fix."""
import dataclasses

import pytest

from internimage.data import DataConfig, SourceConfig


def valid(**overrides) -> DataConfig:
    values = dict(train_sources=[SourceConfig("in22k", "/d/a-{0..3}.tar", 0.3, "class"),
                                 SourceConfig("laion", "/d/b.tar", 0.7, "caption")])
    values.update(overrides)
    return DataConfig(**values)


def test_defaults_validate_and_every_field_but_the_sources_has_a_default():
    valid().validate()
    DataConfig()  # the engine's YAML loader starts from the defaults
    hints = {f.name: f.type for f in dataclasses.fields(DataConfig)}
    assert hints["train_sources"] == list[SourceConfig]


@pytest.mark.parametrize("overrides,message", [
    (dict(train_sources=[]), "train_sources is empty"),
    (dict(train_sources=[SourceConfig("a", "x.tar", kind="text")]), "kind='text'"),
    (dict(train_sources=[SourceConfig("a", "x.tar", weight=0)]), "weight=0"),
    (dict(train_sources=[SourceConfig("a", "x.tar"), SourceConfig("a", "y.tar")]), "unique"),
    (dict(batch_size=0), "batch_size=0 must be > 0"),
    (dict(workers=-1), "workers=-1 must be >= 0"),
    (dict(reprob=1.5), "reprob=1.5 is a probability"),
    (dict(crop_scale=[0.5, 0.1]), "crop_scale"),
    (dict(crop_ratio=[0.75]), "crop_ratio"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(eval_crop_ratio=0.0), "eval_crop_ratio"),
    (dict(randaugment_magnitude=12), "randaugment_magnitude"),
    (dict(max_failure_rate=1.5), "max_failure_rate=1.5 is a probability"),
    (dict(failure_window=0), "failure_window=0 must be > 0"),
    (dict(shuffle_buffer_mib=0), "shuffle_buffer_mib=0 must be > 0"),
    (dict(max_image_mib=-1), "max_image_mib=-1 must be > 0"),
    (dict(max_text_kib=0), "max_text_kib=0 must be > 0"),
    (dict(read_timeout_s=0), "read_timeout_s=0 must be > 0"),
    (dict(train_sources=[SourceConfig("a", "x.tar", caption_keys=[])]), "caption_keys=[]"),
])
def test_bad_values_raise_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        valid(**overrides).validate()
