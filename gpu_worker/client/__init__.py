"""gpu_worker's public helpers for the layers above it (hub_spawner, the CLI, tests).

Anything outside gpu_worker uses these, never the daemon's or the shim's internals."""
from ..shim import shim_dir
from .env import shim_env
from .tokens import token_hash
from .units import format_size, parse_size

__all__ = ["format_size", "parse_size", "shim_dir", "shim_env", "token_hash"]
