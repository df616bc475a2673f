"""Generate the shim's C stubs, the worker's Python dispatch and the wire constants from :mod:`gpu_worker.api.table`.

Run ``python -m gpu_worker.api.codegen`` (or ``make generate``) after editing the table; the
outputs are committed so that building the shim needs neither Python nor CUDA headers.
``--check`` exits non-zero when the committed files are stale (used by the tests).
"""
from __future__ import annotations

import argparse
import re
import struct
import sys
from pathlib import Path

from . import table as T

PKG = Path(__file__).resolve().parent.parent  # gpu_worker/
C_OUT = PKG / "shim" / "gl_generated.c"
PY_OUT = PKG / "daemon" / "dispatch_generated.py"
WIRE_H = PKG / "shim" / "gl_wire.h"
WIRE_PY = PKG / "api" / "wire.py"
NAMES_FILE = PKG / "shim" / "driver_api_names.txt"

WIRE = {"i32": ("int", "i", 4), "u32": ("unsigned int", "I", 4), "u64": ("unsigned long long", "Q", 8),
        "f32": ("float", "f", 4), "size": ("size_t", "Q", 8), "dptr": ("CUdeviceptr", "Q", 8)}
HANDLE_CTYPES = {"ctx": "CUcontext", "stream": "CUstream", "event": "CUevent", "module": "CUmodule",
                 "function": "CUfunction", "library": "CUlibrary", "kernel": "CUkernel",
                 "graph": "CUgraph", "graph_exec": "CUgraphExec", "mempool": "CUmemoryPool"}


def ctype(t: str) -> str:
    if t.startswith("h:"):
        return HANDLE_CTYPES[t[2:]]
    return WIRE[t][0]


def fmt(t: str) -> str:
    return "Q" if t.startswith("h:") else WIRE[t][1]


def layout_size(name: str) -> int:
    return struct.calcsize(next(lay.format for lay in T.LAYOUTS if lay.name == name))


def field_fmt(p: T.Param) -> str:
    """A fixed request field's struct format: a struct read by the call travels as raw bytes."""
    return f"{layout_size(p.arg)}s" if p.rule == "inbytes" else fmt(p.type)


def c_param(p: T.Param) -> str:
    r = p.rule
    if r in ("in", "dptr"):
        return f"{ctype(p.type)} {p.name}"
    if r in ("out", "mint"):
        return f"{ctype(p.type)} *{p.name}"
    if r == "cstr":
        return f"const char *{p.name}"
    if r == "outstr":
        return f"char *{p.name}"
    if r in ("outbytes", "outvar", "hostout", "null"):
        return f"void *{p.name}"
    if r in ("image", "hostin", "inbytes"):
        return f"const void *{p.name}"
    if r == "ignored":
        return f"{p.type} {p.name}"
    raise ValueError(r)


def wire_in(f: T.Func):
    """Fixed-size request fields in order, then the one variable field (if any)."""
    fixed = [p for p in f.params if p.rule in ("in", "dptr", "mint", "inbytes")]
    var = [p for p in f.params if p.rule in ("cstr", "image", "hostin")]
    assert len(var) <= 1, f.name
    return fixed, (var[0] if var else None)


def wire_out(f: T.Func):
    fixed = [p for p in f.params if p.rule in ("out", "outbytes")]
    var = [p for p in f.params if p.rule in ("outstr", "outvar")]
    bulk = [p for p in f.params if p.rule == "hostout"]
    assert len(var) + len(bulk) <= 1, f.name
    return fixed, (var[0] if var else None), (bulk[0] if bulk else None)


def in_struct(f: T.Func) -> str:
    fixed, _ = wire_in(f)
    return "<" + "".join(field_fmt(p) for p in fixed)


def out_struct(f: T.Func) -> str:
    fixed, _, _ = wire_out(f)
    return "<" + "".join(f"{p.arg}s" if p.rule == "outbytes" else fmt(p.type) for p in fixed)


# ----------------------------------------------------------------------------- C side
def gen_c_stub(f: T.Func) -> str:
    op = T.opcode(f)
    sig = ", ".join(c_param(p) for p in f.params) or "void"
    lines = [f"GL_EXPORT CUresult {f.symbol}({sig})", "{"]
    for p in f.params:
        if p.rule in ("out", "mint", "outstr", "outbytes", "outvar", "image", "cstr", "inbytes"):
            lines.append(f"    if ({p.name} == NULL) return CUDA_ERROR_INVALID_VALUE;")
        if p.rule in ("hostin", "hostout"):
            lines.append(f"    if ({p.name} == NULL && {p.arg} != 0) return CUDA_ERROR_INVALID_VALUE;")
        if p.rule == "null":
            lines.append(f'    if ({p.name} != NULL) return gl_unsupported_arg("{f.name}", "a non-NULL {p.name}");')
        if p.rule == "ignored":
            lines.append(f"    (void){p.name};")
    lines.append("    gl_msg m;")
    lines.append(f"    CUresult r = gl_begin(&m, {op} /* {f.name} */, {0 if f.mode == 'async' else 1});")
    lines.append("    if (r != CUDA_SUCCESS) return r;")
    fixed, var = wire_in(f)
    for p in fixed:
        if p.rule == "mint":
            lines.append(f"    *{p.name} = ({ctype(p.type)})gl_mint_handle();")
            lines.append(f"    gl_put_u64(&m, (unsigned long long)(uintptr_t)*{p.name});")
        elif p.rule == "inbytes":
            lines.append(f"    gl_put(&m, {p.name}, GL_{p.arg}_SIZE);")
        elif p.is_handle:
            lines.append(f"    gl_put_u64(&m, (unsigned long long)(uintptr_t){p.name});")
        else:
            lines.append(f"    gl_put_{fmt(p.type)}(&m, {p.name});")
    if var is not None:
        if var.rule == "cstr":
            lines.append(f"    gl_put_bulk(&m, {var.name}, strlen({var.name}));")
        elif var.rule == "image":
            lines.append("    size_t image_size = 0;")
            lines.append(f"    const void *image_data = gl_image_data({var.name}, &image_size);")
            lines.append('    if (image_data == NULL) { gl_abort(&m); return CUDA_ERROR_INVALID_IMAGE; }')
            lines.append("    gl_put_bulk(&m, image_data, image_size);")
        else:
            lines.append(f"    gl_put_bulk(&m, {var.name}, {var.arg});")
    ofixed, ovar, obulk = wire_out(f)
    if f.mode == "async":
        assert not ofixed and ovar is None and obulk is None, f.name
        lines.append(f"    r = gl_post(&m, {int(f.send_now)});")
    else:
        if obulk is not None:
            lines.append(f"    r = gl_call(&m, {obulk.name}, {obulk.arg});")
        else:
            lines.append("    r = gl_call(&m, NULL, 0);")
        if ofixed or ovar is not None:
            lines.append("    if (r == CUDA_SUCCESS) {")
            for p in ofixed:
                if p.rule == "outbytes":
                    lines.append(f"        gl_get(&m, {p.name}, {p.arg});")
                elif p.is_handle:
                    lines.append(f"        unsigned long long {p.name}_id = 0; gl_get(&m, &{p.name}_id, 8);")
                    lines.append(f"        *{p.name} = ({ctype(p.type)})(uintptr_t){p.name}_id;")
                else:
                    n = WIRE[p.type][2]
                    lines.append(f"        gl_get(&m, {p.name}, {n});")
            if ovar is not None:
                if ovar.rule == "outstr":
                    lines.append(f"        gl_get_str(&m, {ovar.name}, {ovar.arg});")
                else:
                    lines.append(f"        gl_get_var(&m, {ovar.name}, {ovar.arg});")
            lines.append("        r = gl_reply_status(&m);")
            lines.append("    }")
    lines.append("    gl_end(&m);")
    if f.c_after:
        lines.append(f"    if (r == CUDA_SUCCESS) {f.c_after};")
    if f.c_failed:
        lines.append(f"    if (r != CUDA_SUCCESS) {f.c_failed};")
    lines.append("    return r;")
    lines.append("}")
    return "\n".join(lines)


def all_driver_names() -> list[str]:
    return [n for n in NAMES_FILE.read_text().split() if n]


def gen_c(names: list[str]) -> str:
    out = ["/* GENERATED by `python -m gpu_worker.api.codegen` from gpu_worker/api/table.py: do not edit. */",
           '#include "gl_shim.h"', ""]
    forwarded_symbols = {f.symbol for f in T.FORWARDED}
    local_symbols = {abi for abi, _ in T.LOCAL.values()} | set(T.LOCAL_PLAIN)
    for f in T.FORWARDED:
        out.append(gen_c_stub(f))
        out.append("")
    out.append("/* Every other driver entry point answers CUDA_ERROR_NOT_SUPPORTED and names itself once on stderr;")
    out.append(" * those that libraries probe on healthy runs (table.PROBED) say so in the debug log only. */")
    for n in names:
        if n in forwarded_symbols or n in local_symbols:
            continue
        if n in T.PROBED:
            out.append(f'GL_EXPORT CUresult {n}(void) {{ return gl_probed("{n}"); }}')
        else:
            out.append(f'GL_EXPORT CUresult {n}(void) {{ static int once; return gl_unsupported("{n}", &once); }}')
    out.append("")
    out.append("/* Bytes of a memory pool attribute's value (table.MEMPOOL_ATTR_SIZES); 0: one we do not know. */")
    out.append("size_t gl_mempool_attr_size(int attr)")
    out.append("{")
    out.append("    switch (attr) {")
    for attr, size in sorted(T.MEMPOOL_ATTR_SIZES.items()):
        out.append(f"    case {attr}: return {size};")
    out.append("    default: return 0;")
    out.append("    }")
    out.append("}")
    out.append("")
    out.append("/* Answered by the hand-written shim files without a round trip. */")
    for abi, _ in T.LOCAL.values():
        out.append(f"CUresult {abi}();")
    out.append("")
    out.append("/* cuGetProcAddress table: (name, first CUDA version of the ABI, entry point). */")
    out.append("const gl_proc gl_procs[] = {")
    rows = []
    for f in T.FORWARDED:
        rows.append((f.name, f.since, f.symbol))
        for extra in f.extra_names:
            nm, since = extra.split("@")
            rows.append((nm, int(since), f.symbol))
    for name, (abi, since) in T.LOCAL.items():
        rows.append((name, since, abi))
    taken = {r[0] for r in rows}
    for n in names:
        if n not in taken and n not in forwarded_symbols and n not in local_symbols:
            rows.append((n, 0, n))
    for name, since, sym in sorted(rows):
        out.append(f'    {{"{name}", {since}, (void *){sym}}},')
    out.append("};")
    out.append("const size_t gl_nprocs = sizeof(gl_procs) / sizeof(gl_procs[0]);")
    out.append("")
    out.append("const gl_errname gl_errnames[] = {")
    for code, name in _cuda_result_names():
        out.append(f'    {{{code}, "{name}", "{_describe(name)}"}},')
    out.append("};")
    out.append("const size_t gl_nerrnames = sizeof(gl_errnames) / sizeof(gl_errnames[0]);")
    return "\n".join(out) + "\n"


def _cuda_result_names():
    """CUresult values and names, read from the installed cuda-bindings enum."""
    from cuda.bindings import driver

    return sorted((int(v), v.name) for v in driver.CUresult)


def _describe(name: str) -> str:
    words = name.replace("CUDA_ERROR_", "").replace("CUDA_", "").lower().replace("_", " ")
    return "no error" if name == "CUDA_SUCCESS" else words


# ------------------------------------------------------------------ wire constants
def _c_literal(v: int) -> str:
    return f"{v}u" if v <= 0xFFFFFFFF else f"{v}ull"


def gen_wire_h() -> str:
    out = ["/* GENERATED by `python -m gpu_worker.api.codegen` from gpu_worker/api/table.py (WIRE, LAYOUTS):",
           " * do not edit. The numbers the shim and the worker must agree on; see docs/protocol.md. */",
           "#ifndef GL_WIRE_H", "#define GL_WIRE_H", ""]
    for c in T.WIRE:
        out.append(f"#define GL_{c.name} {_c_literal(c.value)}  /* {c.doc} */")
    out.append("")
    out.append("/* Fixed frame parts, little endian, no padding. */")
    for lay in T.LAYOUTS:
        out.append(f"#define GL_{lay.name}_SIZE {struct.calcsize(lay.format)}u  /* {lay.doc} */")
    out += ["", "#endif"]
    return "\n".join(out) + "\n"


def gen_wire_py() -> str:
    out = ['"""GENERATED by `python -m gpu_worker.api.codegen` from gpu_worker/api/table.py (WIRE, LAYOUTS): do not',
           'edit.  The numbers the shim and the worker must agree on; gpu_worker.api.protocol re-exports them."""', ""]
    for c in T.WIRE:
        out.append(f"{c.name} = {c.value}  # {c.doc}")
    out.append("")
    out.append("# Fixed frame parts as struct formats (little endian, no padding).")
    for lay in T.LAYOUTS:
        out.append(f'{lay.name}_FORMAT = "{lay.format}"  # {lay.doc}')
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ Python side
def gen_py_handler(f: T.Func) -> str:
    fixed, var = wire_in(f)
    ofixed, ovar, obulk = wire_out(f)
    fixed_size = struct.calcsize(in_struct(f))
    call_args = ["a_" + p.name for p in f.params if p.rule in ("in", "dptr", "cstr", "image", "hostin", "inbytes")]
    lines = [f"def make_{f.name}(s):",
             f'    fn = s.impl("{f.name}")']
    if fixed:
        lines.append(f'    unpack = struct.Struct("{in_struct(f)}").unpack_from')
    if ofixed:
        lines.append(f'    pack = struct.Struct("{out_struct(f)}").pack')
    lines.append("")
    lines.append("    def handle(p):")
    if var is None:
        lines.append(f"        if len(p) != {fixed_size}:")
        lines.append(f'            raise ProtocolError("{f.name}: payload of %d bytes, expected {fixed_size}" % len(p))')
    else:
        lines.append(f"        if len(p) < {fixed_size + 8}:")
        lines.append(f'            raise ProtocolError("{f.name}: payload of %d bytes is too short" % len(p))')
        lines.append(f"        (n,) = U64.unpack_from(p, {fixed_size})")
        lines.append(f"        if n != len(p) - {fixed_size + 8}:")
        lines.append(f'            raise ProtocolError("{f.name}: variable field of %d bytes does not fit the frame" % n)')
        conv = ".tobytes().decode('utf-8', 'replace')" if var.rule == "cstr" else ""
        lines.append(f"        a_{var.name} = p[{fixed_size + 8}:]{conv}")
    if fixed:
        names = ", ".join("a_" + p.name for p in fixed)
        lines.append(f"        {names}{',' if len(fixed) == 1 else ''} = unpack(p)")
    for p in fixed:
        if p.rule == "in" and p.is_handle:
            lines.append(f'        a_{p.name} = s.resolve("{p.type[2:]}", a_{p.name})')
        if p.rule == "dptr":
            span = re.sub(r"\b([A-Za-z_]\w*)\b", r"a_\1", p.arg)
            lines.append(f"        s.check_span(a_{p.name}, {span})")
    args = ", ".join(call_args)
    mints = [p for p in fixed if p.rule == "mint"]
    outs_expected = len(ofixed) + (1 if ovar is not None else 0) + (1 if obulk is not None else 0) + len(mints)
    if outs_expected == 0:
        lines.append(f"        fn({args})")
        lines.append("        return b''")
    else:
        lines.append(f"        res = fn({args})")
        idx = 0
        for p in mints:
            lines.append(f'        s.bind("{p.type[2:]}", a_{p.name}, res[{idx}])')
            idx += 1
        parts = []
        if ofixed:
            parts.append(f"pack(*res[{idx}:{idx + len(ofixed)}])")
            idx += len(ofixed)
        if ovar is not None:
            lines.append(f"        var = bytes(res[{idx}])" + (f"[:max(a_{ovar.arg} - 1, 0)]" if ovar.rule == "outstr"
                                                             else f"[:{ovar.arg}]"))
            parts.append("U64.pack(len(var)) + var")
        if obulk is not None:
            lines.append(f"        return res[{idx}]")
        elif parts:
            lines.append("        return " + " + ".join(parts))
        else:
            lines.append("        return b''")
    lines.append("")
    lines.append("    return handle")
    return "\n".join(lines)


def gen_py() -> str:
    out = ['"""GENERATED by `python -m gpu_worker.api.codegen` from gpu_worker/api/table.py: do not edit."""',
           "import struct", "", "from ..api.protocol import ProtocolError", "",
           'U64 = struct.Struct("<Q")', ""]
    for f in T.FORWARDED:
        if f.server == "special":
            continue
        out.append(gen_py_handler(f))
        out.append("")
    out.append("# opcode -> (name, mode, factory or None when the worker side is hand-written)")
    out.append("OPS = {")
    for f in T.FORWARDED:
        factory = "None" if f.server == "special" else f"make_{f.name}"
        out.append(f'    {T.opcode(f)}: ("{f.name}", "{f.mode}", {factory}),')
    out.append("}")
    out.append("")
    out.append("# opcode -> request struct of the fixed fields, for hand-written handlers")
    out.append("IN_STRUCTS = {")
    for f in T.FORWARDED:
        if f.server == "special":
            out.append(f'    "{f.name}": struct.Struct("{in_struct(f)}"),')
    out.append("}")
    return "\n".join(out) + "\n"


def write_names_file():
    """Refresh the list of every driver API name from the installed cuda-bindings."""
    import cuda.bindings

    pxd = Path(cuda.bindings.__file__).parent / "cydriver.pxd"
    names = sorted(set(re.findall(r"cdef CUresult (cu\w+)\(", pxd.read_text())))
    NAMES_FILE.write_text("\n".join(names) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed outputs are stale")
    ap.add_argument("--refresh-names", action="store_true",
                    help="re-read the driver API names from the installed cuda-bindings")
    a = ap.parse_args(argv)
    if a.refresh_names:
        write_names_file()
    outputs = {C_OUT: gen_c(all_driver_names()), PY_OUT: gen_py(), WIRE_H: gen_wire_h(), WIRE_PY: gen_wire_py()}
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if a.check:
        for p in stale:
            print(f"stale: {p} (run `python -m gpu_worker.api.codegen`)", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        p.write_text(outputs[p])
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
