"""Sizes as people write them in config files and profiles."""


def parse_size(text) -> int:
    """'8G', '512M', '1024' -> bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def format_size(n: int) -> str:
    """Bytes as a person reads them in a message: 3221225472 -> '3.0 GiB', 100 -> '100 bytes'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} byte" if n == 1 else f"{n} bytes"
