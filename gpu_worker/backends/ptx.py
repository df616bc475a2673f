"""Read kernel signatures from PTX text: the emulated backend's source of parameter layouts."""
from __future__ import annotations

import re
from dataclasses import dataclass

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\((.*?)\)", re.S)
_PARAM = re.compile(
    r"\.param\s+(?:\.align\s+(\d+)\s+)?\.([a-z]\d+)(?:\s+\.ptr(?:\s+\.(?:global|const|shared|local))?"
    r"(?:\s+\.align\s+\d+)?)?\s+([A-Za-z_$][\w$]*)(?:\[(\d+)\])?")
_VERSION = re.compile(r"^\s*\.version\s+(\d+)\.(\d+)", re.M)
_SIZES = {"8": 1, "16": 2, "32": 4, "64": 8}


@dataclass(frozen=True)
class Param:
    type: str     # e.g. u64, f32, b8
    offset: int
    size: int
    count: int    # array length, 0 for scalars

    def decode(self, raw: bytes):
        import struct

        if self.count:
            return bytes(raw)
        code = {"u": "BHIQ", "s": "bhiq", "b": "BHIQ", "f": "xefd"}[self.type[0]]["8 16 32 64".split().index(self.type[1:])]
        return struct.unpack("<" + code, raw)[0]


def parse_entries(ptx: str) -> dict[str, list[Param]]:
    """Map each ``.entry`` in ``ptx`` to its parameters with offsets and sizes."""
    entries = {}
    for m in _ENTRY.finditer(ptx):
        params, offset = [], 0
        for pm in _PARAM.finditer(m.group(2)):
            align, ty, _name, count = pm.groups()
            elem = _SIZES.get(ty[1:])
            if elem is None:
                raise ValueError(f"unknown PTX parameter type .{ty}")
            n = int(count) if count else 0
            size = elem * (n or 1)
            a = int(align) if align else elem
            offset = -(-offset // a) * a
            params.append(Param(ty, offset, size, n))
            offset += size
        entries[m.group(1)] = params
    return entries


def ptx_version(ptx: str) -> tuple[int, int] | None:
    m = _VERSION.search(ptx)
    return (int(m.group(1)), int(m.group(2))) if m else None


def looks_like_ptx(image: bytes) -> bool:
    head = image[:4096]
    return b".version" in head or b".target" in head or b".entry" in image
