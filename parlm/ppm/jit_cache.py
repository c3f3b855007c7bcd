"""Keep numba's on-disk kernel cache honest for this package.

`numba.njit(cache=True)` keys a cached kernel on its own source file's timestamp only, so
editing a helper that another module's kernel inlines (byte_model.legacy_logp inside
reference_mixture._legacy_kernel) would silently reuse stale machine code. `refresh_numba_cache` hashes
the sources of every module with cached kernels and drops this package's cached kernels when
the hash changed; parlm.ppm calls it on import, before any kernel loads.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

KERNEL_MODULES = ("counts.py", "byte_model.py", "reference_mixture.py", "audit.py", "ppmd.py")


def refresh_numba_cache(package_dir: Path | None = None) -> bool:
    """Delete `__pycache__/*.nbi|*.nbc` when the kernel sources changed; True if it did."""
    package_dir = Path(package_dir or Path(__file__).resolve().parent)
    digest = hashlib.sha256()
    for name in KERNEL_MODULES:
        path = package_dir / name
        if path.exists():
            digest.update(path.read_bytes())
    cache = package_dir / "__pycache__"
    stamp = cache / "numba_kernel_sources.sha256"
    try:
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            return False
        for pattern in ("*.nbi", "*.nbc"):
            for cached in cache.glob(pattern):
                cached.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # read-only install: numba then caches elsewhere or recompiles
        return False
    return True
