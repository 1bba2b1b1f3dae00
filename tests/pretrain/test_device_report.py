"""The device check's closing table: which bench results become rows, and what a row says."""
from tools.gpu_report import format_row, known_gmacs, timed_rows


def _row(model, micro_batch, checkpointing=True, **extra):
    return {"model": model, "img_size": 224, "micro_batch": micro_batch,
            "checkpointing": checkpointing, "images_per_s": 100.0 * micro_batch,
            "peak_memory_gib": micro_batch / 8, "gmacs_per_image": 4.9, **extra}


def test_a_finished_search_shows_only_its_final_timing():
    rows = [_row("h", 32, probe=True), _row("h", 64, probe=True),
            {**_row("h", 128, probe=True), "oom": True}, _row("h", 64, largest=True, first_oom=128)]
    assert timed_rows(rows) == [rows[-1]]
    assert "128 did not fit" in format_row(rows[-1], per_core=None)


def test_a_search_cut_short_shows_its_largest_fitting_probe():
    rows = [_row("t", 64), _row("h", 32, probe=True), _row("h", 64, probe=True),
            {**_row("h", 128, probe=True), "oom": True}, _row("h", 16, False, probe=True)]
    shown = timed_rows(rows)
    assert [(r["model"], r["micro_batch"], r.get("cut_short", False)) for r in shown] == \
        [("t", 64, False), ("h", 64, True), ("h", 16, True)]
    assert "search cut short" in format_row(shown[1], per_core=None)


def test_cores_are_the_training_rate_over_one_workers_rate():
    line = format_row(_row("t", 8), per_core=300.0)  # 800 img/s over 300 per core: 3 cores
    assert line.split()[4:8] == ["800.0", "-", "1.0", "3"]
    assert format_row({**_row("t", 8), "oom": True}, per_core=300.0).endswith("out of memory")


def test_known_gmacs_is_the_count_of_that_model_at_that_size():
    rows = [{**_row("t", 8), "img_size": 32, "gmacs_per_image": 0.1}, _row("t", 8),
            {**_row("h", 8), "oom": True}]
    del rows[2]["gmacs_per_image"]
    assert known_gmacs(rows, "t", 224) == 4.9 and known_gmacs(rows, "t", 32) == 0.1
    assert known_gmacs(rows, "h", 224) is None
