"""PPM byte mixtures over a run's per-token NLL dump.

- `legacy`: the PR #1858 mixture reproduced exactly (NOT a normalized distribution; SPEC 6.6).
- `byte_model`, `counts`: the compiled PPM byte model and its hash table of contexts.
- `audit`: how far the legacy mixture's implied totals are from 1; a true PPM-D with exclusion.
- `run`: the pipeline stage `ppm_run(config, run_dir)`; `python -m parlm.ppm` is the CLI.
The valid token-level alternative lives in `parlm.mixture`.
"""
from .bytestream import TokenByteLayout
from .legacy import NOT_NORMALIZED_NOTE, LegacyResult, legacy_mixture


def ppm_run(config, run_dir, **kwargs):
    """Pipeline stage: legacy mixture over `<run_dir>/nll.npz` -> ppm.json + ppm_trace.npz
    (`parlm.ppm.run.ppm_run`)."""
    from .run import ppm_run as _ppm_run

    return _ppm_run(config, run_dir, **kwargs)


__all__ = ["TokenByteLayout", "LegacyResult", "legacy_mixture", "NOT_NORMALIZED_NOTE", "ppm_run"]
