"""Shared pytest fixtures: paths into ../shared (skipped when absent) and tiny configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from parlm.config import Config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _shared_path(relative: str) -> Path:
    path = SHARED_DIR / relative
    if not path.exists():
        pytest.skip(f"{path} is not present (../shared is only available in CI and dev checkouts)")
    return path


@pytest.fixture(scope="session")
def wiki_docs_path() -> Path:
    return _shared_path("corpus/wiki2015/docs_selected.jsonl.xz")


@pytest.fixture(scope="session")
def sp1024_path() -> Path:
    return _shared_path("tokenizers/fineweb_1024_bpe.model")


@pytest.fixture(scope="session")
def sp8192_path() -> Path:
    return _shared_path("tokenizers/fineweb_8192_bpe.model")


TINY_MODEL = dict(
    vocab_size=1024, num_layers=4, model_dim=32, embedding_dim=32, num_heads=2, num_kv_heads=1,
    rope_dims=8, xsa_last_n=4, loop_start=1, loop_end=2, parallel_residual_start=3,
    train_seq_len=32, eval_seq_len=32, rope_train_seq_len=32, micro_batches_per_step=2,
    train_batch_tokens=256, val_batch_tokens=512, eval_stride=8, ttt_chunk_tokens=128,
    ttt_batch_seqs=4, eval_batch_seqs=8, device="cpu", compile="off", warmup_steps=1,
    gptq_calibration_batches=2, max_wallclock_seconds=0, iterations=4, val_loss_every=0,
    train_log_every=1, muon_momentum_warmup_steps=10,
)


@pytest.fixture
def tiny_config() -> Config:
    """A seconds-on-CPU Config with the reference's structure (loops, parallel blocks, XSA,
    skips) and no data paths; tests that need data add them."""
    return Config().replace(**TINY_MODEL)


TINY_DATASET_NAME = "tiny_stdlib_sp1024"


@pytest.fixture(scope="session")
def tiny_dataset_config(tmp_path_factory) -> Config:
    """`tiny_config` settings pointing at a small real dataset built once per session: a
    ~250 kB slice of the embedded stdlib-docstring corpus, a 1024-piece tokenizer trained on
    it with the official recipe, 8 kB+ of validation tokens and several 20k-token train shards.
    Needs nothing from ../shared."""
    from parlm.data.corpus import build_dataset, iter_documents, stdlib_corpus, write_documents

    root = tmp_path_factory.mktemp("tiny_dataset")
    texts, size = [], 0
    for text in iter_documents(stdlib_corpus(root / "corpus" / "stdlib_docs.jsonl")):
        texts.append(text)
        size += len(text)
        if size >= 250_000:
            break
    docs = write_documents(texts, root / "corpus" / "tiny_stdlib.jsonl")
    num_val_docs, val_chars = 0, 0
    while val_chars < 40_000:  # ~3 characters per token -> well over 8k validation tokens
        val_chars += len(texts[num_val_docs])
        num_val_docs += 1
    build_dataset(docs, root, num_val_docs=num_val_docs, vocab_size=1024, name=TINY_DATASET_NAME,
                  shard_tokens=20_000, workers=1, progress=False)
    return Config().replace(**TINY_MODEL, data_dir=str(root), dataset_name=TINY_DATASET_NAME,
                            tokenizer_path=str(root / "tokenizers" / "tiny_stdlib_1024_bpe.model"))


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one thread, and 2-core machines are often shared (and run
    parallel test workers). Modules of tiny-model tests use it for every test:
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
