"""Read kernel signatures from PTX text: the emulated backend's source of parameter layouts.

The text comes from a client, so every scan here is linear in its length: a regex whose failed
match runs to the end of the text, retried at each position, made 100 KiB of crafted PTX cost
seconds of the worker's CPU."""
from __future__ import annotations

import re
from dataclasses import dataclass

_ENTRY_HEAD = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(")
_PARAM = re.compile(
    r"\.param\s+(?:\.align\s+(\d+)\s+)?\.([a-z]\d+)(?:\s+\.ptr(?:\s+\.(?:global|const|shared|local))?"
    r"(?:\s+\.align\s+\d+)?)?\s+([A-Za-z_$][\w$]*)(?:\[(\d+)\])?")
_VERSION = re.compile(r"^[ \t]*\.version[ \t]+(\d+)\.(\d+)", re.M)  # [ \t]: \s would span lines
_SIZES = {"8": 1, "16": 2, "32": 4, "64": 8}
# a module-scope variable: `.visible .global .align 4 .b8 table[64];` ([ \t]: one line only)
_GLOBAL = re.compile(r"^[ \t]*(?:\.(?:visible|weak)[ \t]+)?\.global[ \t]+(?:\.align[ \t]+\d+[ \t]+)?"
                     r"\.([a-z]\d+)[ \t]+([A-Za-z_$][\w$]*)(?:\[(\d+)\])?", re.M)


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


def parse_globals(ptx: str) -> dict[str, int]:
    """Map each module-scope ``.global`` variable in ``ptx`` to its size in bytes."""
    out = {}
    for ty, name, count in _GLOBAL.findall(ptx):
        elem = _SIZES.get(ty[1:])
        if elem is not None:
            out[name] = elem * (int(count) if count else 1)
    return out


def parse_entries(ptx: str) -> dict[str, list[Param]]:
    """Map each ``.entry`` in ``ptx`` to its parameters with offsets and sizes."""
    entries = {}
    for name, plist in _entry_lists(ptx):
        params, offset = [], 0
        for pm in _PARAM.finditer(plist):
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
        entries[name] = params
    return entries


def _entry_lists(ptx: str):
    """(name, parameter list text) of each ``.entry``, in one pass over the text."""
    pos = 0
    while True:
        at = ptx.find(".entry", pos)
        if at < 0:
            return
        m = _ENTRY_HEAD.match(ptx, at)
        if m is None:
            pos = at + len(".entry")
            continue
        close = ptx.find(")", m.end())
        if close < 0:
            return  # no ')' left: no later entry can have a parameter list either
        yield m.group(1), ptx[m.end():close]
        pos = close + 1


def ptx_version(ptx: str) -> tuple[int, int] | None:
    m = _VERSION.search(ptx)
    return (int(m.group(1)), int(m.group(2))) if m else None


def looks_like_ptx(image: bytes) -> bool:
    head = image[:4096]
    return b".version" in head or b".target" in head or b".entry" in image
