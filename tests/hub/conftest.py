"""A real `gpulab up` per test module (see hubtools.Hub); a pool of its own per test; one PostgreSQL
server for the session (tools/postgres_server.py), of which each test takes a fresh database."""
import itertools
import os

import pytest

from hubtools import RUNNING_POOLS, Hub, Pool
from workertools import load_script


@pytest.fixture(autouse=True)
def _no_pool_left():
    """A test that fails between starting two pools (or forgets one) leaves no pool process running."""
    yield
    for p in list(RUNNING_POOLS):
        p.stop()


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


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of the tests' own (fsync off: nothing here needs to outlive a crash of the
    machine). Without Debian's package the tests skip, except in CI ($CI set), where `make test`'s
    bootstrap installs it and a skip would hide a gap."""
    server = load_script("gpulab_postgres_server", "tools/postgres_server.py")
    try:
        pg = server.TemporaryPostgres(settings={"fsync": "off"}).start()
    except server.PostgresMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    yield pg
    pg.stop()


_databases = itertools.count(1)


@pytest.fixture
def postgres_url(postgres):
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return postgres.create_database(f"test_{next(_databases)}")
