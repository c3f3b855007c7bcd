"""SentencePiece tokenizers: the official training recipe (SPEC 1.3) and the byte tables that
turn token losses into bits per byte (SPEC 1.6).

Bits per byte is tokenizer-agnostic only if every scorer charges each token the same number
of UTF-8 bytes of text. `ByteTables.count_bytes` is that single rule, used by evaluation, TTT
and the PPM byte stream alike.
"""
from __future__ import annotations

import io
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from parlm.runlog import atomic_write_bytes

SPACE_PIECE = "\u2581"  # SentencePiece's visible space "▁"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# spm's trainer silently drops training "sentences" longer than this many bytes.
MAX_SENTENCE_BYTES = 4192
# Recorded in the model file; the learned pieces are the same for any thread count.
TRAINER_THREADS = 16

# The challenge export's trainer settings (SPEC 1.3; data/download_hf_docs_and_tokenize.py).
OFFICIAL_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    hard_vocab_limit=False,
)


class NoTrainingText(ValueError):
    """train_tokenizer got no non-empty text."""


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file; FileNotFoundError says how to get one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {path} not found; train one with `python -m parlm.data tokenizer --docs "
            f"FILE --vocab-size N --out {path}` or download it with `python -m parlm.data download`")
    return spm.SentencePieceProcessor(model_file=str(path))


def training_sentences(texts: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterable[str]:
    """Feed documents to the trainer as lines packed into chunks of at most `max_bytes` UTF-8
    bytes (NUL -> space, stripped, empty dropped as in the official export).

    The official export passes whole documents, which spm skips when they exceed
    max_sentence_length (4192 bytes); packing lines keeps long documents in the training data
    while giving the same pieces, since BPE pieces never cross whitespace.
    """
    for text in texts:
        text = text.replace("\x00", " ").strip()
        if not text:
            continue
        chunk, size = [], 0
        for line in text.split("\n"):
            line = line.strip()
            length = len(line.encode("utf-8"))
            if not line or length > max_bytes:
                continue
            if size + length + 1 > max_bytes and chunk:
                yield " ".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += length + 1
        if chunk:
            yield " ".join(chunk)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike,
                    **overrides) -> spm.SentencePieceProcessor:
    """Train a SentencePiece BPE model with the official recipe at `vocab_size` pieces and write
    it to `out_path` (plus the `.vocab` listing beside it); returns the loaded model.

    Settings: OFFICIAL_TRAINER_SETTINGS (byte_fallback, split_digits, nmt_nfkc,
    add_dummy_prefix=False, character_coverage=0.999, pad/bos/eos/unk = 0/1/2/3, bpe), updated
    by `overrides`. The model file is a pure function of the input texts: every sentence is
    read (no sampling or shuffling), the random seed is fixed, and nothing machine-specific is
    recorded in it (no output path; a constant thread count, which does not change the pieces).
    """
    out_path = Path(out_path)
    if out_path.suffix != ".model":
        raise ValueError(f"tokenizer path {out_path} must end in .model")
    settings = dict(OFFICIAL_TRAINER_SETTINGS, vocab_size=int(vocab_size), num_threads=TRAINER_THREADS,
                    input_sentence_size=0, shuffle_input_sentence=False,
                    max_sentence_length=MAX_SENTENCE_BYTES, minloglevel=2)
    settings.update(overrides)
    sentences = iter(training_sentences(texts))
    first = next(sentences, None)
    if first is None:
        raise NoTrainingText(f"no training text for {out_path}: every document is empty (or none was given)")
    spm.set_random_generator_seed(1337)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=itertools.chain([first], sentences), model_writer=model,
                                   **settings)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    atomic_write_bytes(out_path.with_suffix(".vocab"), vocab.encode("utf-8"))
    atomic_write_bytes(out_path, model.getvalue())  # the .model appearing marks completion
    return load_tokenizer(out_path)


def _is_tensor(value) -> bool:
    """True for a torch.Tensor; torch is imported lazily (only tensors need it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _as_processor(sp_or_path) -> spm.SentencePieceProcessor:
    if isinstance(sp_or_path, spm.SentencePieceProcessor):
        return sp_or_path
    return load_tokenizer(sp_or_path)


@dataclass
class ByteTables:
    """Per-token byte tables of SPEC 1.6 over `max(tokenizer vocab, vocab_size)` ids.

    - is_boundary[id]: control, unknown, unused ids (and padding ids past the tokenizer's vocab).
    - base_bytes[id]: 0 for boundary ids, 1 for byte-fallback ids `<0xNN>`, else the UTF-8
      length of the piece after removing one leading `▁`.
    - has_leading_space[id]: the piece starts with `▁`.
    - token_bytes[id]: the piece's bytes without the leading `▁`; the raw byte for `<0xNN>`;
      b"" for boundary ids.
    """

    base_bytes: np.ndarray
    has_leading_space: np.ndarray
    is_boundary: np.ndarray
    token_bytes: list[bytes]
    _device_tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_tokenizer(cls, sp_or_path, vocab_size: int | None = None) -> "ByteTables":
        """Build the tables from a SentencePieceProcessor or a model path. Raises ValueError if
        `▁` is not its own piece (the reference's requirement for correct space counting)."""
        sp = _as_processor(sp_or_path)
        sp_vocab = int(sp.vocab_size())
        size = max(sp_vocab, int(vocab_size or 0))
        if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
            raise ValueError("tokenizer has no '\u2581' (space) piece of its own, so bytes per token "
                             "cannot be counted as the reference does; use a model that has one")
        base_bytes = np.zeros(size, dtype=np.int16)
        has_leading_space = np.zeros(size, dtype=np.bool_)
        is_boundary = np.ones(size, dtype=np.bool_)
        token_bytes = [b""] * size
        for token_id in range(sp_vocab):
            if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
                continue
            is_boundary[token_id] = False
            piece = sp.id_to_piece(token_id)
            if sp.is_byte(token_id):
                base_bytes[token_id] = 1
                token_bytes[token_id] = bytes([int(piece[3:-1], 16)])
                continue
            if piece.startswith(SPACE_PIECE):
                has_leading_space[token_id] = True
                piece = piece[1:]
            encoded = piece.encode("utf-8")
            base_bytes[token_id] = len(encoded)
            token_bytes[token_id] = encoded
        return cls(base_bytes, has_leading_space, is_boundary, token_bytes)

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.shape[0])

    def to_torch(self, device) -> "ByteTables":
        """A ByteTables whose three tables are torch tensors on `device` (int16, bool, bool);
        cached per device. `token_bytes` is shared."""
        import torch

        device = torch.device(device)
        if _is_tensor(self.base_bytes) and self.base_bytes.device == device:
            return self
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = ByteTables(
                torch.as_tensor(np.asarray(self.base_bytes), dtype=torch.int16).to(device),
                torch.as_tensor(np.asarray(self.has_leading_space), dtype=torch.bool).to(device),
                torch.as_tensor(np.asarray(self.is_boundary), dtype=torch.bool).to(device),
                self.token_bytes)
        return self._device_tables[key]

    def count_bytes(self, target, prev, positions=None):
        """Bytes charged to each target token given its previous token (SPEC 1.6):

            bytes(t | p) = base_bytes[t] + [has_leading_space[t] and not is_boundary[p]]

        `positions` (the targets' stream positions) is accepted and unused, so that callers
        pass it alike to these tables and to `parlm.data.accounting.SidecarBytes`.

        `target` and `prev` are same-shape integer numpy arrays or torch tensors; the result
        has that shape, is int64, and is a torch tensor on target's device for torch input, a
        numpy array otherwise.
        """
        if _is_tensor(target):
            import torch

            tables = self.to_torch(target.device)
            target = target.long()
            prev = torch.as_tensor(prev, device=target.device).long()
            space = tables.has_leading_space[target] & ~tables.is_boundary[prev]
            return tables.base_bytes[target].long() + space.long()
        if _is_tensor(self.base_bytes):
            import torch

            return self.count_bytes(torch.as_tensor(np.asarray(target)).to(self.base_bytes.device),
                                    torch.as_tensor(np.asarray(prev))).cpu().numpy()
        target = np.asarray(target, dtype=np.int64)
        prev = np.asarray(prev, dtype=np.int64)
        space = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target].astype(np.int64) + space.astype(np.int64)

    def stream_bytes(self, tokens) -> int:
        """Total bytes of a token stream scored from position 1 on: sum of count_bytes(t[1:], t[:-1])."""
        if len(tokens) < 2:
            return 0
        return int(self.count_bytes(tokens[1:], tokens[:-1]).sum())
