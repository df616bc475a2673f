"""Sizes as a person reads them in messages (parsing sizes is limits.py's job)."""


def format_size(n: int) -> str:
    """Bytes as a person reads them in a message: 3221225472 -> '3.0 GiB', 100 -> '100 bytes'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} byte" if n == 1 else f"{n} bytes"
