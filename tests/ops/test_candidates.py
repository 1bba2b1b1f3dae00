"""The CUDA kernel candidate choice (ops/candidates.py): a table checked at import, one override."""
import copy

import pytest
import torch

from internimage.ops import candidates


def test_the_shipped_table_names_a_valid_candidate_for_every_direction_dtype_and_shape_class():
    table = candidates.checked_table(candidates.TABLE)
    for direction in candidates.CANDIDATES:
        for dtype in candidates.DTYPES:
            assert set(table[direction][dtype]) == set(candidates.SHAPE_CLASSES)


def test_untiled_kernels_stay_the_default_until_a_gpu_measures_the_others():
    assert {name for d in candidates.TABLE.values() for row in d.values() for name in row.values()} == {"untiled"}


@pytest.mark.parametrize("side, klass", [(56, "large"), (28, "medium"), (14, "small"), (7, "small")])
def test_internimage_stages_fall_into_shape_classes(side, klass):
    assert candidates.shape_class(side, side) == klass


def test_a_table_entry_that_is_no_candidate_is_refused():
    table = copy.deepcopy(candidates.TABLE)
    table["backward"]["bfloat16"]["small"] = "fastest"
    with pytest.raises(ValueError, match="backward/bfloat16/small is 'fastest'"):
        candidates.checked_table(table)
    del table["forward"]["float16"]
    with pytest.raises(ValueError, match="forward/float16/large is None"):
        candidates.checked_table(table)


def test_choose_follows_the_table_then_the_override(monkeypatch):
    monkeypatch.setitem(candidates.TABLE["forward"]["bfloat16"], "small", "points_split")
    monkeypatch.delenv(candidates.OVERRIDE_ENV, raising=False)
    assert candidates.choose("forward", torch.bfloat16, 7, 7) == "points_split"
    assert candidates.choose("forward", torch.bfloat16, 56, 56) == "untiled"
    monkeypatch.setenv(candidates.OVERRIDE_ENV, "tiled")
    assert candidates.choose("forward", torch.bfloat16, 7, 7) == "tiled"
    assert candidates.choose("backward", torch.float16, 56, 56) == "tiled"
    monkeypatch.setenv(candidates.OVERRIDE_ENV, "backward=split")
    assert candidates.choose("backward", torch.float32, 28, 28) == "split"
    assert candidates.choose("forward", torch.bfloat16, 7, 7) == "points_split"  # not overridden


@pytest.mark.parametrize("text", ["fastest", "forward=chunk4", "sideways=untiled"])
def test_an_override_that_names_no_candidate_is_an_error(text):
    with pytest.raises(ValueError, match="is not a candidate"):
        candidates.parse_override(text)


def test_a_bare_name_overrides_only_the_directions_that_have_it():
    assert candidates.parse_override("chunk4") == {"backward": "chunk4"}
    assert candidates.parse_override("untiled") == {"forward": "untiled", "backward": "untiled"}
