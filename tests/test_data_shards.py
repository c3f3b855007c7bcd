"""Shard format (SPEC 1.2), its faults, the inspect CLI, and validation truncation (SPEC 1.4)."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from parlm.data.__main__ import main as data_main
from parlm.data.shards import (ShardError, load_shard, load_validation_tokens, open_shard, read_header,
                               validate_shard, write_shard)


def hand_made_shard(path, tokens, magic=20240520, version=1, count=None, extra=b""):
    """A shard assembled byte by byte with struct, independent of write_shard."""
    count = len(tokens) if count is None else count
    header = struct.pack("<256i", magic, version, count, *([0] * 253))
    path.write_bytes(header + struct.pack(f"<{len(tokens)}H", *tokens) + extra)
    return path


def test_write_shard_matches_hand_made_bytes(tmp_path):
    tokens = [1, 500, 65535, 0, 7]
    write_shard(tmp_path / "a.bin", np.array(tokens))
    hand_made_shard(tmp_path / "b.bin", tokens)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert (tmp_path / "a.bin").stat().st_size == 1024 + 2 * len(tokens)
    assert read_header(tmp_path / "a.bin").num_tokens == 5
    assert open_shard(tmp_path / "a.bin").tolist() == tokens
    assert load_shard(tmp_path / "a.bin").tolist() == tokens


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        write_shard(tmp_path / "x.bin", np.array([1, 65536]))
    assert not (tmp_path / "x.bin").exists()


FAULTS = {
    "bad magic": (dict(magic=12345), "bad magic 12345"),
    "bad version": (dict(version=2), "bad version 2"),
    "truncated payload": (dict(count=10), "truncated payload"),
    "size mismatch": (dict(extra=b"\x00\x00\x00"), "size mismatch"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_gives_one_line_error_naming_file(tmp_path, fault):
    kwargs, expected = FAULTS[fault]
    path = hand_made_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3, 4], **kwargs)
    with pytest.raises(ShardError) as info:
        read_header(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path) + ": ")
    assert expected in message


def test_token_id_outside_vocab(tmp_path):
    path = hand_made_shard(tmp_path / "s.bin", [1, 10, 1023, 1024, 5])
    validate_shard(path)  # header alone is fine
    with pytest.raises(ShardError) as info:
        validate_shard(path, vocab_size=1024)
    assert str(info.value) == (f"{path}: token id 1024 at position 3 >= vocab_size 1024 (max id 1024); "
                               f"the shard comes from a larger vocabulary: use its tokenizer and "
                               f"vocab_size, or rebuild the dataset")
    with pytest.raises(ShardError, match="token id 1024"):
        load_shard(path, vocab_size=1024)


def test_truncated_header(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError, match="truncated header"):
        read_header(path)


@pytest.mark.parametrize("fault", sorted(FAULTS) + ["token id"])
def test_inspect_cli_exits_nonzero_with_one_line(tmp_path, capsys, fault):
    if fault == "token id":
        path, expected = hand_made_shard(tmp_path / "s.bin", [1, 9000]), "token id 9000"
    else:
        kwargs, expected = FAULTS[fault]
        path = hand_made_shard(tmp_path / "s.bin", [1, 2, 3, 4], **kwargs)
    status = data_main(["inspect", str(path), "--vocab-size", "8192"])
    captured = capsys.readouterr()
    assert status == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0]


def test_inspect_cli_prints_stats(tmp_path, capsys):
    good = hand_made_shard(tmp_path / "good.bin", [1, 5, 5, 7, 1, 5])
    assert data_main(["inspect", str(good), "--vocab-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "tokens=6" in out and "ids 1..7" in out and "distinct=3" in out and "bos(id 1)=2" in out
    assert "5x3" in out  # id 5 is the most frequent, three times


def test_inspect_cli_process_exit_code(tmp_path):
    bad = hand_made_shard(tmp_path / "bad.bin", [1, 2], magic=7)
    result = subprocess.run([sys.executable, "-m", "parlm.data", "inspect", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {bad}: bad magic 7 (expected 20240520); not a challenge shard"


def test_validation_tail_truncation_across_files(tmp_path):
    # 3 files, 11 + 7 + 5 = 23 tokens; seq_len 4 -> usable = (23-1)//4*4 = 20 -> 21 tokens kept.
    stream = np.arange(23) + 100
    write_shard(tmp_path / "fineweb_val_000001.bin", stream[11:18])
    write_shard(tmp_path / "fineweb_val_000000.bin", stream[:11])
    write_shard(tmp_path / "fineweb_val_000002.bin", stream[18:])
    tokens = load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 4)
    assert tokens.dtype == torch.int32 and tokens.device.type == "cpu"
    assert tokens.tolist() == list(range(100, 121))
    # max_tokens=9 keeps 10 tokens first -> usable (10-1)//4*4 = 8 -> 9 tokens.
    assert load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 4, max_tokens=9).tolist() == list(range(100, 109))
    # an exact fit keeps everything: 21 tokens, seq_len 5 -> usable 20.
    assert len(load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 5, max_tokens=20)) == 21


def test_validation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard files"):
        load_validation_tokens(str(tmp_path / "none_*.bin"), 4)
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(4))
    with pytest.raises(ValueError, match="too short"):
        load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 4)
