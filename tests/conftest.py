"""Fixtures: real worker processes (see workertools) and the GPU marker."""
import pytest

from workertools import Worker, gpu_present


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long (minutes each)")


def pytest_collection_modifyitems(config, items):
    skip_long = pytest.mark.skip(reason="long: run with `pytest --long -m long`")
    skip_gpu = pytest.mark.skip(reason="needs a real NVIDIA GPU (run `pytest -m gpu` on a GPU machine)")
    has_gpu = gpu_present()
    for item in items:
        if "long" in item.keywords and not config.getoption("--long"):
            item.add_marker(skip_long)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


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


