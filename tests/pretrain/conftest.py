"""Fixtures shared by the pretraining tests."""
import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo shards, written once per session."""
    from internimage.data import write_demo_data
    out = tmp_path_factory.mktemp("demo_data")
    write_demo_data(str(out))
    return str(out)
