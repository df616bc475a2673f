"""gpu_worker's public helpers for the layers above it (hub_spawner, the CLI, tests).

Anything outside gpu_worker uses these, never the daemon's or the shim's internals."""
from ..shim import native_dir, shim_dir
from .env import shim_env
from .tokens import token_hash
from .limits import (GPU_KEYS, QOS, LimitError, Size, default_burst, gpu_settings, parse_count, parse_share,
                     parse_size, token_limits)
from .units import format_size

__all__ = ["GPU_KEYS", "QOS", "LimitError", "Size", "default_burst", "format_size", "gpu_settings", "native_dir",
           "parse_count", "parse_share", "parse_size", "shim_dir", "shim_env", "token_hash", "token_limits"]
