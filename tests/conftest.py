"""Fixtures shared by the test modules."""
import pytest
import torch

from tests.helpers.cluster import Cluster


@pytest.fixture(scope="module")
def one_thread():
    """Small batches: one torch thread is as fast, and two stall badly when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cluster(tmp_path):
    """``cluster(*coordinator_args)`` -> a Cluster (coordinator and worker processes on 127.0.0.1),
    every one of them stopped at the end of the test."""
    made = []

    def make(*args):
        c = Cluster(tmp_path, *args)
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()
