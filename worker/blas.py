"""Make MLX's Linux CPU build use the system OpenBLAS.

The `mlx[cpu]` wheel links a slow reference BLAS; loading the system OpenBLAS
globally before MLX is imported makes its symbols win, and matmul about 50x
faster. Must run before the first `import mlx`.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)
_CANDIDATES = (
    "libopenblas.so.0",
    "libopenblas.so",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


_loaded: str | None = None  # what an earlier call loaded: callers each make sure, and only the first counts


def preload_openblas() -> str | None:
    global _loaded
    if _loaded is not None or not sys.platform.startswith("linux"):
        return _loaded
    if "mlx.core" in sys.modules:
        log.warning("mlx was imported before OpenBLAS could be preloaded; matmul will be slow")
    for name in _CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            _loaded = name
            return name
        except OSError:
            continue
    log.warning("system OpenBLAS not found (Debian: apt-get install libopenblas0-pthread); MLX on CPU will be slow")
    return None
