"""A real `gpulab up` per test module (see hubtools.Hub)."""
import pytest

from hubtools import Hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    h = Hub(tmp_path_factory.mktemp("hub") / "state")
    yield h
    h.stop()
