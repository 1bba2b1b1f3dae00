"""Fixtures shared by the pretraining tests."""
import glob
import os

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo shards, written once per session."""
    from internimage.data import write_demo_data
    out = tmp_path_factory.mktemp("demo_data")
    write_demo_data(str(out))
    return str(out)


@pytest.fixture(autouse=True)
def release_deepspeed_shared_memory():
    """DeepSpeed's CPU all-reduce leaves a shared-memory buffer per (master port, rank) in /dev/shm
    when its processes exit; every test picks a fresh port, so without this the suite leaks about
    64 MB per rank and run, gigabytes by the end. No DeepSpeed process outlives a test."""
    yield
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.remove(path)
        except OSError:
            pass
