"""Fault injection, configuration (issue 15): every bad value is refused by one validation pass,
with one line naming the key, the value and what is allowed, through `Config(...)`, `--set`
overrides, YAML files and `python -m parlm.run`, before any run folder exists."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parlm import run
from parlm.config import FIELD_RULES, FIELD_TYPES, PRESET_DIR, Config, ConfigError, parse_overrides

REPO_ROOT = Path(__file__).resolve().parents[1]

# (override as typed on the command line, the value as given to Config directly, the line)
BAD_VALUES = [
    ("iterations=1.5", 1.5, "iterations=1.5: must be an integer >= 1"),
    ("train_seq_len=0", 0, "train_seq_len=0: must be an integer >= 1"),
    ("device=gpu", "gpu", "device='gpu': must be one of 'auto', 'cuda', 'cpu'"),
    ("matrix_lr=nan", math.nan, "matrix_lr=nan: must be a finite number >= 0"),
    ("ema_decay=2", 2.0, "ema_decay=2.0: must be a finite number in [0, 1)"),
    ("iterations=-5", -5, "iterations=-5: must be an integer >= 1"),
]


@pytest.mark.parametrize("override,value,line", BAD_VALUES)
def test_bad_value_given_to_config_directly(override, value, line):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as caught:
        Config(**{key: value})
    assert str(caught.value) == line and caught.value.problems == [line]


@pytest.mark.parametrize("override,value,line", BAD_VALUES)
def test_bad_value_through_overrides_yaml_and_papermill_parameters(override, value, line, tmp_path):
    with pytest.raises(ConfigError) as caught:  # what parlm.run and every notebook do
        Config.from_preset("demo", parse_overrides([override]))
    assert str(caught.value) == line
    key, text = override.split("=")
    path = tmp_path / "config.yaml"
    path.write_text(f"{key}: {text}\n")
    with pytest.raises(ConfigError) as caught:  # a run folder's config.yaml
        Config.load(path)
    assert str(caught.value) == f"{path}: {line}"


@pytest.mark.parametrize("override,value,line", BAD_VALUES)
def test_parlm_run_refuses_before_creating_the_run_folder(override, value, line, tmp_path, capsys):
    code = run.main(["--preset", "demo", "--seeds", "42", "--run-id", "bad", "--runs-dir", str(tmp_path),
                     "--set", override, "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == f"error: {line}\n"
    assert list(tmp_path.iterdir()) == []


def test_parlm_run_cli_lists_every_problem_at_once(tmp_path):
    """The real command line: one error, one line per bad value, exit code 2, no folder."""
    arguments = [sys.executable, "-m", "parlm.run", "--preset", "demo", "--seeds", "42",
                 "--runs-dir", str(tmp_path), "--run-id", "bad", "--quiet"]
    for override, _, _ in BAD_VALUES:
        arguments += ["--set", override]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=120, env=environment,
                          cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    # -5 is the last --set of iterations, so it replaces 1.5
    expected = {line for override, _, line in BAD_VALUES if override != "iterations=1.5"}
    assert lines[0] == f"error: {len(expected)} config problems:"
    assert {line.strip() for line in lines[1:]} == expected
    assert list(tmp_path.iterdir()) == []


def test_every_problem_is_collected_into_one_error():
    with pytest.raises(ConfigError) as caught:
        Config(iterations=1.5, train_seq_len=0, device="gpu", matrix_lr=math.nan, ema_decay=2,
               num_kv_heads=3)
    problems = caught.value.problems
    assert len(problems) == 6 and all("\n" not in p for p in problems)
    # a rule between fields too; train_seq_len=0 silences the batch rule that divides by it
    assert problems[-1] == "num_heads=8 must be a multiple of num_kv_heads=3"
    assert str(caught.value).splitlines()[0] == "6 config problems:"


@pytest.mark.parametrize("overrides,line", [
    (dict(train_batch_tokens=1000), "train_batch_tokens=1000 must split into micro_batches_per_step=8 "
     "micro-batches of whole train_seq_len=2048 sequences; choose a multiple of 16384"),
    (dict(val_batch_tokens=8192), "val_batch_tokens=8192 must hold at least one eval_seq_len=2048 "
     "sequence per micro-batch (micro_batches_per_step=8): at least 16384"),
    (dict(eval_stride=4096), "eval_stride=4096 must be in 1..eval_seq_len=2048"),
    (dict(ttt_chunk_tokens=1000), "ttt_chunk_tokens=1000 must be a multiple of eval_stride=64 so each "
     "chunk scores whole stride blocks"),
    (dict(num_kv_heads=3), "num_heads=8 must be a multiple of num_kv_heads=3"),
    (dict(rope_dims=80), "rope_dims=80 must be even and <= head_dim=model_dim/num_heads=64, which must be even"),
    (dict(loop_end=11), "loop_start=3..loop_end=11 must be an ordered range inside 0..num_layers-1=10 "
     "(or num_loops=0)"),
    (dict(gptq_reserve_seconds=600.0), "gptq_reserve_seconds=600.0 leaves no training time out of "
     "max_wallclock_seconds=600.0"),
    (dict(mixture_enabled=True, mixture_order=4), "mixture_order=4 with vocab_size=8192 needs 65 bits per "
     "exact int64 context key; use mixture_order <= 3"),
])
def test_cross_field_rules(overrides, line):
    with pytest.raises(ConfigError) as caught:
        Config(**overrides)
    assert caught.value.problems == [line]


def test_cross_field_rule_is_skipped_when_one_of_its_fields_is_invalid():
    with pytest.raises(ConfigError) as caught:
        Config(num_heads=0)  # no ZeroDivisionError from the model_dim % num_heads rule
    assert caught.value.problems == ["num_heads=0: must be an integer >= 1"]


def test_lossless_conversions_are_accepted():
    config = Config().replace(**parse_overrides(["iterations=2.0", "max_wallclock_seconds=30",
                                                 "ttt_enabled=off", "seed=7"]))
    assert (config.iterations, config.max_wallclock_seconds, config.ttt_enabled, config.seed) == (2, 30.0, False, 7)
    assert isinstance(config.iterations, int) and isinstance(config.max_wallclock_seconds, float)
    assert Config(max_wallclock_seconds=30).max_wallclock_seconds == 30.0


@pytest.mark.parametrize("override,line", [
    ("ttt_enabled=maybe", "ttt_enabled='maybe': must be true or false"),
    ("iterations=ten", "iterations='ten': must be an integer >= 1"),
    ("matrix_lr=inf", "matrix_lr=inf: must be a finite number >= 0"),
    ("tie_embeddings=false", "tie_embeddings=False: must be one of True (the reference ties them; "
     "untied heads are not implemented)"),
    ("vocab_size=70000", "vocab_size=70000: must be an integer in [2, 65536] (token ids are stored as uint16)"),
    ("seed=-1", "seed=-1: must be an integer >= 0 (the data sampler's PCG64 takes non-negative seeds)"),
])
def test_more_bad_values(override, line):
    with pytest.raises(ConfigError) as caught:
        Config().replace(**parse_overrides([override]))
    assert caught.value.problems == [line]


def test_unknown_keys_and_malformed_pairs_are_listed_together():
    with pytest.raises(ConfigError) as caught:
        parse_overrides(["itterations=3", "oops"])
    assert caught.value.problems == ["unknown config key 'itterations'; did you mean iterations?",
                                     "override 'oops' must look like key=value"]


def test_validate_adds_world_size_and_tokenizer_to_the_same_list():
    config = Config()
    with pytest.raises(ConfigError) as caught:
        config.validate(world_size=3, tokenizer_vocab_size=1024)
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("world size 3 does not divide micro_batches_per_step=8")
    assert caught.value.problems[1].startswith("vocab_size=8192 but the tokenizer has 1024 pieces")
    config.iterations = 0  # assigned after construction: validate checks again
    with pytest.raises(ConfigError, match="iterations=0: must be an integer >= 1"):
        config.validate()


def test_every_preset_and_the_defaults_validate():
    Config().validate(world_size=8)
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        Config.from_preset(path.stem).validate(world_size=1)


def test_rules_name_real_fields_and_fit_their_types():
    assert set(FIELD_RULES) <= set(FIELD_TYPES)
    defaults = Config()
    for name, rule in FIELD_RULES.items():
        assert rule.admits(getattr(defaults, name)), name
