"""FineWeb downloader against a real HTTP server on 127.0.0.1 serving a small fake dataset repo
in the published layout; huggingface_hub talks to it through its endpoint setting."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from parlm.data.__main__ import main as data_main
from parlm.data.download import DownloadError, download_dataset
from parlm.data.shards import ShardError, load_shard, write_shard

REPO = "someone/fake-golf"
PREFIX = f"/datasets/{REPO}/resolve/main/"


def shard_bytes(tmp_path, name, tokens):
    write_shard(tmp_path / name, np.asarray(tokens))
    return (tmp_path / name).read_bytes()


def make_repo(tmp_path) -> dict[str, bytes]:
    """Remote path -> content of a fake export: sp1024 with 1 val and 3 train shards."""
    rng = np.random.default_rng(0)
    files = {}
    root = "datasets/datasets/fineweb10B_sp1024"
    files[f"{root}/fineweb_val_000000.bin"] = shard_bytes(tmp_path, "v", rng.integers(0, 1024, 3000))
    for i in range(3):
        files[f"{root}/fineweb_train_{i:06d}.bin"] = shard_bytes(tmp_path, f"t{i}", rng.integers(0, 1024, 20000 + i))
    files["datasets/tokenizers/fineweb_1024_bpe.model"] = b"model-bytes" * 100
    files["datasets/tokenizers/fineweb_1024_bpe.vocab"] = b"vocab-bytes" * 10
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    return files


class FakeHub:
    """A Hub-compatible file server: HEAD/GET /datasets/<repo>/resolve/<rev>/<path>, with
    X-Repo-Commit, ETag, Content-Length and byte ranges; logs every request."""

    def __init__(self, files):
        self.files = dict(files)
        self.announced_size: dict[str, int] = {}  # path -> size claimed by HEAD (to fake a mismatch)
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self, body_wanted):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                path = self.path[len(PREFIX):] if self.path.startswith(PREFIX) else None
                if path not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[path]
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                size = hub.announced_size.get(path, len(data)) if self.command == "HEAD" else len(body)
                self.send_header("Content-Length", str(size))
                self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body_wanted:
                    self.wfile.write(body)

            def do_HEAD(self):
                self._serve(False)

            def do_GET(self):
                self._serve(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def gets(self):
        return [(path[len(PREFIX):], rng) for method, path, rng in self.requests if method == "GET"]


@pytest.fixture
def hub(tmp_path):
    server = FakeHub(make_repo(tmp_path))
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join(timeout=10)


def download(hub, data_dir, train_shards=2):
    return download_dataset("sp1024", train_shards, data_dir, repo_id=REPO, endpoint=hub.endpoint,
                            token=False, progress=False)


def test_download_layout_and_skip_on_rerun(hub, tmp_path):
    data = tmp_path / "data"
    result = download(hub, data)
    assert set(result["files"].values()) == {"downloaded"}
    for remote, content in hub.files.items():
        local = data / Path(remote).relative_to("datasets")
        if "fineweb_train_000002" in remote:
            assert not local.exists()  # only the first 2 train shards were asked for
        else:
            assert local.read_bytes() == content, remote
    assert result["dataset_dir"] == str(data / "datasets" / "fineweb10B_sp1024")
    assert len(load_shard(data / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin")) == 20001
    hub.requests.clear()
    again = download(hub, data)
    assert set(again["files"].values()) == {"present"} and hub.gets() == []


def test_resume_after_partial_file(hub, tmp_path):
    data = tmp_path / "data"
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    local = data / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    local.parent.mkdir(parents=True)
    content = hub.files[remote]
    Path(str(local) + ".part").write_bytes(content[:12345])  # a run that stopped midway
    result = download(hub, data)
    assert result["files"][str(local)] == "resumed"
    assert local.read_bytes() == content and not Path(str(local) + ".part").exists()
    assert (remote, "bytes=12345-") in hub.gets()
    assert [rng for path, rng in hub.gets() if path == remote] == ["bytes=12345-"]


def test_corrupt_shard_detected(hub, tmp_path):
    remote = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    hub.files[remote] = hub.files[remote][:-10]  # consistent over HTTP, but the header claims more
    with pytest.raises(ShardError) as info:
        download(hub, tmp_path / "data")
    local = tmp_path / "data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    assert str(info.value).startswith(f"{local}: truncated payload")
    assert not local.exists() and not Path(str(local) + ".part").exists()


def test_size_mismatch_detected(hub, tmp_path):
    remote = "datasets/tokenizers/fineweb_1024_bpe.model"
    hub.announced_size[remote] = len(hub.files[remote]) + 50  # server promises more than it sends
    with pytest.raises(DownloadError, match="size mismatch") as info:
        download(hub, tmp_path / "data")
    assert "fineweb_1024_bpe.model" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "data/tokenizers/fineweb_1024_bpe.model").exists()


def test_errors_for_bad_requests(hub, tmp_path):
    with pytest.raises(DownloadError, match="has 3 train shards"):
        download(hub, tmp_path / "data", train_shards=4)
    with pytest.raises(DownloadError, match="no dataset fineweb10B_sp8192"):
        download_dataset("sp8192", 1, tmp_path / "data", repo_id=REPO, endpoint=hub.endpoint, token=False,
                         progress=False)


def test_cli_download(hub, tmp_path, capsys):
    status = data_main(["download", "--variant", "sp1024", "--train-shards", "1", "--data-dir",
                        str(tmp_path / "d"), "--repo-id", REPO, "--endpoint", hub.endpoint, "--quiet"])
    assert status == 0
    assert "5 downloaded" in capsys.readouterr().out  # manifest, val, 1 train, model, vocab


# ---- the CaseOps export (PR #1729): sidecars and published counts -----------------------------
CASEOPS_DIR = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def make_caseops_repo(tmp_path) -> tuple[dict[str, bytes], dict]:
    """A fake CaseOps export: 2 val shards with sidecars in the published (token-shard magic)
    format, 3 train shards; and its counts worked out here."""
    rng = np.random.default_rng(1)
    root = f"datasets/datasets/{CASEOPS_DIR}"
    files, sidecars, val_tokens = {}, [], 0
    for i, n in enumerate((70, 45)):
        files[f"{root}/fineweb_val_{i:06d}.bin"] = shard_bytes(tmp_path, f"v{i}", rng.integers(0, 8192, n))
        values = rng.integers(0, 9, n)
        sidecars.append(values)
        files[f"{root}/fineweb_val_bytes_{i:06d}.bin"] = shard_bytes(tmp_path, f"b{i}", values)
        val_tokens += n
    for i in range(3):
        files[f"{root}/fineweb_train_{i:06d}.bin"] = shard_bytes(tmp_path, f"t{i}", rng.integers(0, 8192, 500))
    files["datasets/tokenizers/caseops.model"] = b"model" * 10
    manifest = {"datasets": [{"name": CASEOPS_DIR, "tokenizer_name": "caseops", "val_bytes_glob": "x",
                              "stats": {"files_train": 3, "files_val": 2}}],
                "tokenizers": [{"name": "caseops", "model_path": "tokenizers/caseops.model"}]}
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    stream = [int(v) for values in sidecars for v in values]
    scored = (val_tokens - 1) // 16 * 16
    published = dict(train_shards=3, val_tokens=val_tokens, val_scored_tokens=scored, eval_seq_len=16,
                     raw_bytes=sum(stream[1:scored + 1]))
    return files, published


def test_caseops_download_checks_published_counts(tmp_path, monkeypatch):
    import parlm.data.download as download_module
    from parlm.data.shards import SIDECAR_MAGIC, load_validation_byte_counts

    files, published = make_caseops_repo(tmp_path)
    server = FakeHub(files)
    server.thread.start()
    try:
        monkeypatch.setattr(download_module, "CASEOPS_PUBLISHED", published)
        data = tmp_path / "data"
        result = download_dataset("sp8192_caseops", 3, data, repo_id=REPO, endpoint=server.endpoint,
                                  token=False, progress=False)
        assert result["counts"]["raw_bytes"] == published["raw_bytes"]
        assert result["counts"]["val_tokens"] == 115 and result["counts"]["train_shards"] == 3
        folder = data / "datasets" / CASEOPS_DIR
        sidecar = (folder / "fineweb_val_bytes_000000.bin").read_bytes()
        remote = files[f"datasets/datasets/{CASEOPS_DIR}/fineweb_val_bytes_000000.bin"]
        assert int.from_bytes(sidecar[:4], "little") == SIDECAR_MAGIC and sidecar[4:] == remote[4:]
        assert len(load_validation_byte_counts(folder / "fineweb_val_*.bin")) == 115
        # a published count that differs: one line naming the count
        monkeypatch.setattr(download_module, "CASEOPS_PUBLISHED", dict(published, raw_bytes=published["raw_bytes"] + 1))
        with pytest.raises(DownloadError, match="raw_bytes is") as info:
            download_dataset("sp8192_caseops", 3, data, repo_id=REPO, endpoint=server.endpoint,
                             token=False, progress=False)
        assert "\n" not in str(info.value)
    finally:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(timeout=10)


def test_caseops_published_constants():
    from parlm.data.download import CASEOPS_PUBLISHED, dataset_dir_for_variant, default_repo

    assert default_repo("sp8192_caseops") == "romeerp/parameter-golf-caseops-v1"
    assert dataset_dir_for_variant("sp8192_caseops") == CASEOPS_DIR
    published = CASEOPS_PUBLISHED
    assert (published["val_tokens"] - 1) // 2048 * 2048 == published["val_scored_tokens"] == 47_851_520
    assert published["train_shards"] == 80 and published["raw_bytes"] == 151_074_309
