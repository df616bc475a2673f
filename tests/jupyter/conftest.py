"""pytest-jupyter for the tests in this folder only: a Jupyter server (jp_fetch, jp_serverapp, ...) and
async test functions.

Not `pytest_plugins = [...]`: that registers the plugin for the whole run, and its autouse fixtures
(jp_asyncio_loop closes an event loop after each test; jp_server_cleanup builds a ServerApp) and its
pytest_pyfunc_call hook would then act on every test of the suite. The fixtures imported into this
conftest's namespace, and the hooks defined here, apply to tests under tests/jupyter/ alone.
benchmarks/validate_gpu.py leaves this folder out where jupyter_server or pytest-jupyter is missing."""
import importlib

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F401,F403  (its fixtures, jupyter_core's and pytest_tornasync's)

# By its full name: the package attribute `pytest_jupyter.jupyter_core` is not reliably the submodule.
_pytest_jupyter_core = importlib.import_module("pytest_jupyter.jupyter_core")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Collect `async def` tests as plain test functions (pytest-jupyter's hook)."""
    return _pytest_jupyter_core.pytest_pycollect_makeitem(collector, name, obj)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run `async def` tests on pytest-jupyter's event loop (its hook), the others as they are."""
    return _pytest_jupyter_core.pytest_pyfunc_call(pyfuncitem)
