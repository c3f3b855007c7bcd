"""Download the challenge's cached FineWeb export (SPEC 1.1) from a Hugging Face dataset repo.

The published export is manifest-driven. Under the repo's root folder (default `datasets`):

    <root>/manifest.json                                   lists datasets and tokenizers
    <root>/datasets/fineweb10B_<variant>/fineweb_val_NNNNNN.bin    stats.files_val shards
    <root>/datasets/fineweb10B_<variant>/fineweb_train_NNNNNN.bin  stats.files_train shards
    <root>/tokenizers/<model_path | vocab_path | path of the dataset's tokenizer entry>

and lands locally as `DATA_DIR/manifest.json`, `DATA_DIR/datasets/fineweb10B_<variant>/...`,
`DATA_DIR/tokenizers/...`: the layout a Config with that data_dir reads. All validation shards
and the first `train_shards` train shards are fetched.

Each file is streamed into `<file>.part` through huggingface_hub (its URL scheme, metadata
request and retrying HTTP client). A run that stops leaves the `.part`, and the next run
resumes it with an HTTP range request. A finished file must have the size the server
announced, and shards must pass the SPEC 1.2 header/size check; only then is it renamed into
place. A file already in place with the announced size is skipped.

CaseOps (PR #1729): variant `sp8192_caseops` (alias of the export's own name
`sp8192_lossless_caps_caseops_v1_reserved`) comes from romeerp/parameter-golf-caseops-v1 and
adds the validation byte sidecars `fineweb_val_bytes_NNNNNN.bin`. Those are published with the
token-shard magic; once checked they are rewritten with parlm's SIDECAR_MAGIC header (payload
unchanged), then `check_caseops_counts` compares the published counts (CASEOPS_PUBLISHED).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from pathlib import Path

from huggingface_hub import hf_hub_url
from huggingface_hub.file_download import get_hf_file_metadata, http_get
from huggingface_hub.utils import build_hf_headers
from tqdm.auto import tqdm

from parlm.data.shards import (HEADER_BYTES, SHARD_MAGIC, SIDECAR_MAGIC, TOKEN_DTYPE, ShardError,
                               read_header, read_sidecar_header, shard_files, sidecar_path)

DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_REPOS = {"sp8192": "kevclark/parameter-golf", "sp1024": "willdepueoai/parameter-golf"}
FALLBACK_REPO = "willdepueoai/parameter-golf"
DEFAULT_TRAIN_SHARDS = 80
CASEOPS_VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
VARIANT_ALIASES = {"sp8192_caseops": CASEOPS_VARIANT}
DEFAULT_REPOS[CASEOPS_VARIANT] = "romeerp/parameter-golf-caseops-v1"
# The public CaseOps export's counts (FRONTIER.md; PR #1729's logs: val_tokens 47851520).
CASEOPS_PUBLISHED = dict(train_shards=80, val_tokens=47_853_343, val_scored_tokens=47_851_520,
                         eval_seq_len=2048, raw_bytes=151_074_309)


class DownloadError(RuntimeError):
    """A download that cannot complete; the message says which file and why."""


def canonical_variant(variant: str) -> str:
    """`sp8192_caseops` -> the CaseOps export's own name; other variants unchanged."""
    return VARIANT_ALIASES.get(variant, variant)


def default_repo(variant: str) -> str:
    """The published repo of a variant: sp8192 -> kevclark/parameter-golf (the export the
    PR #1858 README points at), CaseOps -> romeerp/parameter-golf-caseops-v1, everything
    else -> willdepueoai/parameter-golf."""
    return DEFAULT_REPOS.get(canonical_variant(variant), FALLBACK_REPO)


def dataset_dir_for_variant(variant: str) -> str:
    """`sp<V>` -> `fineweb10B_sp<V>`; `byte260` -> `fineweb10B_byte260`; CaseOps ->
    `fineweb10B_sp8192_lossless_caps_caseops_v1_reserved`."""
    variant = canonical_variant(variant)
    if variant in ("byte260", CASEOPS_VARIANT) or (variant.startswith("sp") and variant[2:].isdigit()):
        return f"fineweb10B_{variant}"
    raise ValueError(f"unsupported variant {variant!r}; expected sp<VOCAB_SIZE> (sp8192, sp1024) or byte260")


@dataclass
class DownloadPlan:
    """What one download fetches: remote paths (relative to the repo) -> local paths."""

    repo_id: str
    remote_root: str
    files: list[tuple[str, Path]] = field(default_factory=list)


def local_path(remote_path: str, remote_root: str, data_dir: Path) -> Path:
    """Map `<root>/datasets/...`, `<root>/tokenizers/...`, `<root>/X` to `data_dir/...`."""
    parts = Path(remote_path).parts
    if remote_root and parts[:1] == (remote_root,):
        parts = parts[1:]
    return data_dir.joinpath(*parts)


def _remote(remote_root: str, relative: str) -> str:
    return f"{remote_root}/{relative}" if remote_root else relative


def plan_download(manifest: dict, variant: str, train_shards: int, data_dir: Path,
                  repo_id: str, remote_root: str) -> DownloadPlan:
    """The files of `variant` named by the export's manifest (all val shards, the first
    `train_shards` train shards, the tokenizer artifacts)."""
    name = dataset_dir_for_variant(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = [d.get("name") for d in manifest.get("datasets", [])]
        raise DownloadError(f"{repo_id}: manifest has no dataset {name} (it has {known})")
    stats = entry.get("stats") or {}
    files_train, files_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= files_train:
        raise DownloadError(f"{variant} has {files_train} train shards on {repo_id}; requested {train_shards}")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None:
        raise DownloadError(f"{repo_id}: manifest has no tokenizer {entry.get('tokenizer_name')!r} for {name}")
    artifacts = [str(tokenizer[k]) for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    plan = DownloadPlan(repo_id, remote_root)
    remote_paths = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    if entry.get("val_bytes_glob") or canonical_variant(variant) == CASEOPS_VARIANT:
        remote_paths += [f"datasets/{name}/fineweb_val_bytes_{i:06d}.bin" for i in range(files_val)]
    remote_paths += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    remote_paths += artifacts
    for relative in remote_paths:
        remote = _remote(remote_root, relative)
        plan.files.append((remote, local_path(remote, remote_root, data_dir)))
    return plan


def fetch_file(repo_id: str, remote_path: str, destination: Path, *, revision: str | None = None,
               endpoint: str | None = None, token=None, progress: bool = True) -> str:
    """Download one repo file to `destination`, resuming `<destination>.part`; returns
    "present", "downloaded" or "resumed". Raises DownloadError (size) or ShardError (shard
    header/size) with the file named; a bad result is removed so the next run starts afresh."""
    url = hf_hub_url(repo_id, remote_path, repo_type="dataset", revision=revision, endpoint=endpoint)
    metadata = get_hf_file_metadata(url, token=token)
    expected = metadata.size
    if destination.is_file() and (expected is None or destination.stat().st_size == expected):
        return "present"
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    resume = partial.stat().st_size if partial.is_file() else 0
    if expected is not None and resume > expected:
        partial.unlink()
        resume = 0
    headers = build_hf_headers(token=token)
    with open(partial, "r+b" if resume else "wb") as handle:
        handle.seek(resume)
        try:
            http_get(metadata.location or url, handle, resume_size=resume, headers=headers,
                     expected_size=expected, displayed_filename=destination.name)
        except OSError:  # huggingface_hub's consistency check: the byte count is wrong
            received = handle.tell()
            handle.close()
            partial.unlink()
            raise DownloadError(f"{destination}: size mismatch: server announced {expected} bytes but sent "
                                f"{received}; the partial file was removed, rerun to fetch it again") from None
        handle.truncate()
    size = partial.stat().st_size
    if expected is not None and size != expected:
        partial.unlink()
        raise DownloadError(f"{destination}: size mismatch: server announced {expected} bytes, received {size}")
    if destination.suffix == ".bin":
        try:
            read_header(partial)
        except ShardError as error:
            partial.unlink()
            raise ShardError(destination, error.fault) from None
    os.replace(partial, destination)
    return "resumed" if resume else "downloaded"


def download_dataset(variant: str = "sp8192", train_shards: int = DEFAULT_TRAIN_SHARDS,
                     data_dir: str | os.PathLike = "./data/", repo_id: str | None = None,
                     remote_root: str = DEFAULT_REMOTE_ROOT, revision: str | None = None,
                     endpoint: str | None = None, token=None, progress: bool = True) -> dict:
    """Fetch the manifest, then every file of `variant` it names (see the module docstring).

    Returns {"repo_id", "dataset_dir", "files": {local path: present|downloaded|resumed}}.
    `endpoint` overrides the Hub URL (a mirror, or a local test server); `token` is passed to
    huggingface_hub (None: its default lookup; False: send none).
    """
    data_dir = Path(data_dir)
    variant = canonical_variant(variant)
    repo_id = repo_id or default_repo(variant)
    manifest_remote = _remote(remote_root, "manifest.json")
    manifest_local = local_path(manifest_remote, remote_root, data_dir)
    kwargs = dict(revision=revision, endpoint=endpoint, token=token, progress=progress)
    results = {str(manifest_local): fetch_file(repo_id, manifest_remote, manifest_local, **kwargs)}
    manifest = json.loads(manifest_local.read_text(encoding="utf-8"))
    plan = plan_download(manifest, variant, train_shards, data_dir, repo_id, remote_root)
    for remote, destination in tqdm(plan.files, desc=f"download {variant}", unit="file", disable=not progress):
        results[str(destination)] = fetch_file(repo_id, remote, destination, **kwargs)
    dataset_dir = data_dir / "datasets" / dataset_dir_for_variant(variant)
    out = {"repo_id": repo_id, "dataset_dir": str(dataset_dir), "files": results}
    if variant == CASEOPS_VARIANT:
        for token_shard in shard_files(dataset_dir / "fineweb_val_*.bin"):
            adopt_published_sidecar(sidecar_path(token_shard), token_shard)
        out["counts"] = check_caseops_counts(dataset_dir, manifest, train_shards, CASEOPS_PUBLISHED)
    return out


def adopt_published_sidecar(path: Path, token_shard: Path) -> None:
    """Rewrite a sidecar published with the token-shard magic (PR #1729's export) to parlm's
    sidecar header (SIDECAR_MAGIC, same payload), then check it against its token shard."""
    header = np.fromfile(path, dtype="<i4", count=1)
    if header.size and int(header[0]) == SHARD_MAGIC:
        read_header(path)  # size and count agree with the published format
        with open(path, "r+b") as handle:
            handle.write(np.array([SIDECAR_MAGIC], dtype="<i4").tobytes())
    read_sidecar_header(path, token_shard)


def check_caseops_counts(dataset_dir: Path, manifest: dict, train_shards: int,
                         published: dict = CASEOPS_PUBLISHED) -> dict:
    """Compare the CaseOps export with its published counts: files_train in the manifest,
    validation tokens (all, and scored at eval_seq_len), and the raw bytes of the sidecars
    over the scored positions 1..val_scored_tokens (the BPB denominator; the whole-split sum
    is reported beside it). DownloadError names the first count that differs."""
    entry = next(d for d in manifest.get("datasets", []) if d.get("name") == dataset_dir.name)
    files_train = int((entry.get("stats") or {}).get("files_train", 0))
    val_files = shard_files(dataset_dir / "fineweb_val_*.bin")
    val_tokens = sum(read_header(f).num_tokens for f in val_files)
    seq_len = published["eval_seq_len"]
    scored_tokens = (val_tokens - 1) // seq_len * seq_len
    values = np.concatenate([np.fromfile(sidecar_path(f), dtype=TOKEN_DTYPE, offset=HEADER_BYTES)
                             for f in val_files]).astype(np.int64)
    counts = {"train_shards": files_train, "val_tokens": val_tokens, "val_scored_tokens": scored_tokens,
              "raw_bytes": int(values[1:scored_tokens + 1].sum()), "raw_bytes_all": int(values.sum()),
              "train_shards_downloaded": train_shards}
    for key in ("train_shards", "val_tokens", "val_scored_tokens", "raw_bytes"):
        if counts[key] != published[key]:
            raise DownloadError(f"{dataset_dir}: {key} is {counts[key]:,} but the CaseOps export publishes "
                                f"{published[key]:,}; the download is incomplete or not the public export "
                                f"(delete it and download again)")
    return counts
