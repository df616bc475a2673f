"""Where a session's driver calls run: `cuda` (the real GPU through cuda-python) or `emulated`
(a test double for machines without a GPU). Both implement backends.base.Backend."""
