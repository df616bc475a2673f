"""A real `gpulab up` per test module (see hubtools.Hub); a pool of its own per test."""
import pytest

from hubtools import Hub, Pool


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    h = Hub(tmp_path_factory.mktemp("hub") / "state")
    yield h
    h.stop()


@pytest.fixture
def pool(tmp_path):
    p = Pool(str(tmp_path / "pool.sqlite"))
    yield p
    p.stop()
