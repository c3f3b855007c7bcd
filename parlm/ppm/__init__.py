"""PPM byte mixtures over a run's per-token NLL dump.

- `legacy`: the PR #1858 mixture reproduced exactly (NOT a normalized distribution; SPEC 6.6).
- `byte_model`, `counts`: the compiled PPM byte model and its hash tables of contexts.
- `audit`: how far the legacy mixture's implied totals are from 1; `ppmd`: a true PPM-D with
  exclusion (a normalized byte distribution) for contrast.
- `run`: the pipeline stage `ppm_run(config, run_dir)`; `python -m parlm.ppm` is the CLI;
  `plots`: figures from its outputs; `diagnostics.void_fraction`: the logged-only "compass".
The valid token-level alternative lives in `parlm.eval.token_mixture`.
"""
from parlm.ppm.jit_cache import refresh_numba_cache

refresh_numba_cache()  # before any cached kernel loads (see jit_cache)

from parlm.ppm.audit import AuditResult  # noqa: E402
from parlm.ppm.bytestream import TokenByteLayout  # noqa: E402
from parlm.ppm.diagnostics import void_fraction  # noqa: E402
from parlm.ppm.reference_mixture import NOT_NORMALIZED_NOTE, LegacyResult, audit_legacy, legacy_mixture  # noqa: E402
from parlm.ppm.ppmd import PPMDResult, ppmd_score  # noqa: E402


def ppm_run(config, run_dir, **kwargs):
    """Pipeline stage: legacy mixture over `<run_dir>/nll.npz` -> ppm.json + ppm_trace.npz
    (`parlm.ppm.stage.ppm_run`)."""
    from parlm.ppm.stage import ppm_run as _ppm_run

    return _ppm_run(config, run_dir, **kwargs)


__all__ = ["TokenByteLayout", "LegacyResult", "legacy_mixture", "NOT_NORMALIZED_NOTE", "ppm_run",
           "AuditResult", "audit_legacy", "PPMDResult", "ppmd_score", "void_fraction"]
