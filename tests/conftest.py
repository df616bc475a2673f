"""Fixtures: real worker processes (see workertools) and the GPU marker."""
import pytest

from workertools import Worker, gpu_present


def pytest_collection_modifyitems(config, items):
    if gpu_present():
        return
    skip = pytest.mark.skip(reason="needs a real NVIDIA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_worker(tmp_path):
    workers = []

    def make(**kw):
        w = Worker(tmp_path, **kw)
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.stop()


@pytest.fixture
def worker(make_worker):
    return make_worker(extra=("--vram-quota", "64M"))


