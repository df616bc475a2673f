"""The forwarded CUDA driver API described once (table.py), the wire format and CUresult codes;
codegen.py writes the shim's C stubs and the worker's dispatch from the table."""
