"""The generated submission: minification keeps the program, the build is deterministic and
never touches sources, every script form decodes to the program, and the exported records
folder runs standalone (no parlm importable) on a tiny CPU config."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parlm.submission import build, minify
from parlm.submission.minify import minify_modules

REPO_ROOT = Path(__file__).resolve().parents[1]

TRICKY_MODULE = textwrap.dedent('''
    """Module docstring."""
    from __future__ import annotations
    import math
    from dataclasses import dataclass

    GLOBAL_SCALE = 3

    @dataclass
    class Point:
        """Fields keep their annotations (dataclass needs them)."""
        x: int = 1
        y: float = 2.5

        def norm(self) -> float:
            """A docstring."""
            squared: float = self.x ** 2 + self.y ** 2
            return math.sqrt(squared)

        def unused_method(self):
            return "never called"

    def describe(x, y):
        return Point(x, y).norm()

    def unused_helper(value):
        return value * 1000

    def closures(count: int, *, offset: int = 0) -> list:
        total = 0
        results = []
        def add(step):
            nonlocal total
            total += step + offset
            return total
        for index in range(count):
            results.append(add(index))
        squares = [index * index for index in range(count)]
        table = {key: value for key, value in zip("abc", squares)}
        try:
            1 / 0
        except ZeroDivisionError as problem:
            message = type(problem).__name__
        return [results, squares, table, message, total, GLOBAL_SCALE]

    def shadowing(data):
        length = len(data)  # a builtin next to a local
        scaled = [length * item for item in data]
        def inner():
            return length + sum(scaled)
        generator = (length for length in range(3))  # comprehension rebinding the name
        return inner(), list(generator), f"{length=}"

    def uses_globals():
        global GLOBAL_SCALE
        previous = GLOBAL_SCALE
        GLOBAL_SCALE = previous + 1
        return previous

    if __name__ == "__main__":
        print("main block is dropped")
''')


def _run_module(source: str, name: str) -> dict:
    import types

    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    try:
        exec(compile(source, name, "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module.__dict__


def test_minified_module_behaves_the_same():
    roots = {"tricky": {"describe", "closures", "shadowing", "uses_globals"}}
    minified = minify_modules({"tricky": TRICKY_MODULE}, roots)["tricky"]
    assert '"""' not in minified and "docstring" not in minified
    assert "unused_helper" not in minified and "unused_method" not in minified
    assert "main block" not in minified
    assert "x:int=1" in minified  # dataclass field annotations kept
    assert "from __future__ import annotations" in minified  # they still need it
    assert "->float" not in minified and "count:int" not in minified
    assert len(minified) < 0.7 * len(TRICKY_MODULE)
    original, small = _run_module(TRICKY_MODULE, "tricky_a"), _run_module(minified, "tricky_b")
    assert original["describe"](3, 4.0) == small["describe"](3, 4.0) == 5.0
    assert original["closures"](5, offset=2) == small["closures"](5, offset=2)
    assert original["shadowing"]([1, 2, 3]) == small["shadowing"]([1, 2, 3])
    assert original["uses_globals"]() == small["uses_globals"]() == 3
    assert small["GLOBAL_SCALE"] == 4


def test_minifier_drops_annotations_and_whitespace():
    """Without class-level annotations the future import goes too; the whitespace left is what
    the tokens need (hand-worked examples), and the program still does the same."""
    source = textwrap.dedent('''
        from __future__ import annotations
        LIMIT: int = 3
        def pick(values: list[int], *extra: int, scale: float = 1.5, **named) -> list:
            kept: list = [value for value in values if value > LIMIT or value in extra]
            return [item * scale if item else .5 for item in kept] + [1.e3, 0x1F, 2j, (1).real] + [
                named.get("k", "a" "b"), not -1, f"{scale!r:>{LIMIT}}", -LIMIT ** -2, str(LIMIT) in "abc3" or 'x']
    ''')
    minified = minify_modules({"m": source}, {"m": {"pick"}})["m"]
    assert "__future__" not in minified and "int" not in minified and "->" not in minified
    assert "LIMIT=3\n" in minified and "def pick(values,*extra,scale=1.5,**named):\n" in minified
    original, small = _run_module(source, "pick_a"), _run_module(minified, "pick_b")
    assert original["pick"]([1, 5, 0, 7], 0, scale=2.0, k="z") == small["pick"]([1, 5, 0, 7], 0, scale=2.0, k="z")
    assert minify._squeeze("x = 1 if a else 0.5\nif a in 'b' and not -1:\n    y = (1).real\n") == \
        "x=1 if a else 0.5\nif a in'b'and not-1:\n y=(1).real\n"


def test_shake_follows_a_name_to_the_module_it_comes_from():
    """A def survives for a `from M import name` of its own module only; an import no code
    uses goes, even where another module imports the same name."""
    modules = {"parlm.a": "def shared():\n return 1\ndef same_name():\n return 2\n",
               "parlm.b": "from parlm.a import shared\nfrom parlm.c import same_name\ndef run():\n return shared() + same_name()\n",
               "parlm.c": "def same_name():\n return 3\n",
               "parlm.d": "from parlm.a import shared\nfrom parlm.c import same_name\n"}
    out = minify_modules(modules, {"parlm.b": {"run"}})
    assert "shared" in out["parlm.a"] and "same_name" not in out["parlm.a"] and "same_name" in out["parlm.c"]
    assert out["parlm.d"] == "pass\n"
    namespace = {}
    exec(out["parlm.c"] + out["parlm.a"] + out["parlm.b"].split("\n", 2)[2], namespace)
    assert namespace["run"]() == 4


def test_every_script_form_runs_the_program(tmp_path):
    program = "import sys\nRESULT = bytes(range(256)) * 3 + '\\u00e9\\n\\'\"'.encode()\nprint(len(RESULT))\n"
    candidates = build.candidate_scripts(program)
    assert set(candidates) == {"plain", "lzma-b85", "lzma-latin1", "brotli-b85", "brotli-latin1"}
    for name, script in candidates.items():
        path = tmp_path / f"{name}.py"
        path.write_bytes(script)
        output = subprocess.run([sys.executable, "-I", str(path)], capture_output=True, text=True, check=True)
        assert output.stdout.strip() == str(256 * 3 + 5), name


def _tree_fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_build_is_deterministic_and_never_touches_sources(tmp_path):
    import shutil

    # A private copy of the sources (others may edit the shared tree while this runs).
    sources = tmp_path / "src" / "parlm"
    shutil.copytree(build.package_root(), sources, ignore=shutil.ignore_patterns("__pycache__"))
    before = _tree_fingerprint(sources)
    report: dict = {}
    first = build.build_submission_script(root=sources, report=report, use_cache=False)
    second = build.build_submission_script(root=sources, use_cache=False)
    assert first == second
    assert _tree_fingerprint(sources) == before
    assert len(first) == min(report["sizes"].values())
    assert "parlm.ppm" not in report["modules"] and "parlm.report" not in report["modules"]
    assert {"parlm.train.loop", "parlm.quant.stage", "parlm.eval.stage", "parlm.model.gpt"} <= set(report["modules"])
    for target in (build.package_root() / "train_gpt.py", build.package_root() / "model" / "gpt.py"):
        with pytest.raises(ValueError, match="inside the parlm sources"):
            build.write_generated_file(target, first)
    assert not (build.package_root() / "train_gpt.py").exists()
    written = build.write_generated_file(tmp_path / "train_gpt.py", first)
    assert written.read_bytes() == first


def test_bundle_serves_only_its_own_modules(tmp_path):
    modules = {"parlm": "", "parlm.alpha": "VALUE = 41\n",
               "parlm.submission": "", "parlm.submission.entry":
               "def main(path):\n from parlm.alpha import VALUE\n print(VALUE + 1, path.endswith('x.py'))\n"
               " try:\n  import parlm.model.gpt\n except ImportError as e:\n  print('blocked', e)\n"}
    program = build.bundle_program(modules, {"parlm", "parlm.submission"})
    path = tmp_path / "x.py"
    path.write_text(program)
    output = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True,
                            cwd=REPO_ROOT)  # the real parlm is importable from here, and still unused
    assert output.stdout.splitlines() == ["42 True", "blocked not in this bundle: parlm.model"]


# ----------------------------------------------------------------------------------------
# Records folder and the standalone script
BLOCKER = textwrap.dedent('''
    import importlib.abc, runpy, sys
    class BlockInstalledParlm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "parlm" or name.startswith("parlm."):
                raise ImportError("the installed parlm is blocked: " + name)
    sys.meta_path.insert(0, BlockInstalledParlm())
    try:
        import parlm
    except ImportError:
        pass
    else:
        raise SystemExit("parlm is still importable")
    sys.argv = ["train_gpt.py"] + sys.argv[1:]
    runpy.run_path("train_gpt.py", run_name="__main__")
''')


def _fake_seed(folder: Path, config, seed: int, bytes_model: int) -> None:
    from parlm.runlog import write_json

    folder.mkdir(parents=True)
    config.replace(seed=seed).save(folder / "config.yaml")
    write_json(folder / "train.json", {"steps": 10 + seed, "train_seconds": 1.5, "prequant_bpb": 2.0})
    write_json(folder / "eval.json", {"quantized_bpb": 2.1, "sliding_bpb": 2.05, "ttt_bpb": 2.0 - seed / 1000,
                                      "ttt_seconds": 3.0})
    write_json(folder / "quant.json", {"bytes_model": bytes_model, "bytes_total": bytes_model + 1,
                                       "code_sha256": "old"})
    (folder / "train.log").write_text(f"training seed {seed}\n")
    (folder / "quant.log").write_text("quant log\n")


def test_export_records_folder(tmp_path, tiny_config):
    from parlm.submission import export
    from parlm.submission.records import ExportError

    run_root = tmp_path / "runs" / "demo"
    _fake_seed(run_root / "seed_1", tiny_config, 1, 1000)
    _fake_seed(run_root / "seed_2", tiny_config, 2, 1500)
    out = tmp_path / "records"
    summary = export(run_root, out)
    script = (out / "train_gpt.py").read_bytes()
    assert summary["bytes_code"] == len(script)
    assert summary["bytes_total"] == 1500 + len(script)  # worst case over seeds
    assert summary["seeds"]["1"]["bytes_total"] == 1000 + len(script)
    assert summary["seeds"]["2"]["code_matches_run"] is False
    assert abs(summary["val_bpb"] - (1.999 + 1.998) / 2) < 1e-12
    assert json.loads((out / "submission.json").read_text()) == summary
    assert "training seed 2" in (out / "train_seed2.log").read_text()
    assert "quant log" in (out / "train_seed1.log").read_text()
    assert "train_gpt.py seed=1" in (out / "README.md").read_text()
    export(run_root, out)  # an earlier export may be replaced
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier parlm export"):
        export(run_root, tmp_path / "occupied")
    _fake_seed(run_root / "seed_3", tiny_config.replace(artifact_cap_bytes=2000), 3, 1999)
    with pytest.raises(ExportError, match="over the"):
        export(run_root, tmp_path / "records2")


# Every frontier quantization switch on (issue 17), sized for the tiny model (model_dim 32).
ALL_QUANT_SWITCHES = dict(mlp_clip_sigmas=12.0, lqer_top_k=3, lqer_rank=4, lqer_group_size=64, awq_lite_groups=1,
                          awq_lite_group_size=16, awq_lite_bits=8, gptq_calibration_batches=3, compressor="per_group")


@pytest.mark.slow
@pytest.mark.parametrize("switches", [{}, ALL_QUANT_SWITCHES], ids=["pr1858", "all_quant_switches"])
def test_exported_script_runs_standalone(tmp_path, tiny_dataset_config, switches):
    """The records folder's train_gpt.py trains, quantizes and scores a tiny CPU config with
    only its embedded modules: the installed parlm is blocked and the repo is off sys.path.
    The package, given the script's trained weights, writes the same artifact bytes and
    scores the same quantized BPB."""
    from parlm.config import Config

    script = build.build_submission_script()
    folder = tmp_path / "records"
    build.write_generated_file(folder / "train_gpt.py", script)
    config = tiny_dataset_config.replace(quant_passthrough_max_numel=256, val_max_tokens=512, ttt_epochs=1,
                                         sliding_window_enabled=False, ttt_chunk_tokens=256, seed=7, **switches)
    defaults = Config().to_dict()
    overrides = [f"{key}={value}" for key, value in config.to_dict().items() if value != defaults[key]]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    result = subprocess.run([sys.executable, "-I", "-c", BLOCKER, *overrides], cwd=folder, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = [line for line in result.stdout.splitlines() if line.startswith("final ")]
    assert final and "quantized_bpb:" in final[0] and "ttt_bpb:" in final[0]
    run_dir = folder / "logs" / "seed_7"
    quant = json.loads((run_dir / "quant.json").read_text())
    assert quant["bytes_code"] == len(script) and quant["fits_cap"]
    assert (run_dir / "final_model.int6.ptz").stat().st_size == quant["bytes_model"]
    assert json.loads((run_dir / "eval.json").read_text())["quantized_bpb"] > 0
    assert (folder / "train_gpt.py").read_bytes() == script  # never written over itself
    from parlm.eval.stage import evaluate_run
    from parlm.quant.stage import quantize_run

    package_dir = tmp_path / "package" / "seed_7"
    package_dir.mkdir(parents=True)
    for name in ("final_model.pt", "train.json"):
        (package_dir / name).write_bytes((run_dir / name).read_bytes())
    quantize_run(config, package_dir, code_bytes=len(script), statistics=False)
    assert (package_dir / "final_model.int6.ptz").read_bytes() == (run_dir / "final_model.int6.ptz").read_bytes()
    package_eval = evaluate_run(config.replace(ttt_enabled=False), package_dir)
    script_eval = json.loads((run_dir / "eval.json").read_text())
    assert package_eval["quantized_bpb"] == script_eval["quantized_bpb"]
    if switches:
        methods = quant["stream_bytes"]
        assert methods["corrections"] > 0  # the LQER / AWQ-lite tensors are counted in bytes_model


def test_records_are_portable_and_state_the_contest_cap(tmp_path, tiny_config):
    """A run that raised artifact_cap_bytes to go on still exports, and submission.json says the
    worst seed exceeds the contest's 16,000,000 bytes; no absolute path of the machine is left in
    the folder; the reproduce commands carry every setting as a flag; the environment comes from
    the train.log header."""
    from parlm.submission import export

    run_root = tmp_path / "runs" / "raised"
    data_dir = tmp_path / "elsewhere" / "data"
    config = tiny_config.replace(artifact_cap_bytes=17_000_000, data_dir=str(data_dir),
                                 tokenizer_path=str(data_dir / "tokenizers" / "t.model"))
    for seed in (1, 2):
        _fake_seed(run_root / f"seed_{seed}", config, seed, 16_100_000)
        folder = run_root / f"seed_{seed}"
        (folder / "train.log").write_text(
            f"  data_dir: {data_dir}\npython: 3.11.7\ntorch: 2.13.0+cu130\ngpu: NVIDIA H200\n"
            f"gpu_count: 1\nplatform: Linux-x\nworld_size:1 grad_accum_steps:8\ntorch: not this\n"
            f"saved to {folder.resolve()}/final_model.pt\n")
    out = tmp_path / "records"
    summary = export(run_root, out)
    assert summary["cap"] == 16_000_000 and summary["run_cap"] == 17_000_000
    assert summary["fits_cap"] is False
    assert summary["headroom_bytes"] == 16_000_000 - summary["bytes_total"] < 0
    readme = (out / "README.md").read_text()
    assert "EXCEEDS the contest's cap of 16,000,000 bytes" in readme and "17,000,000" in readme
    assert summary["environment"]["1"]["torch"] == "2.13.0+cu130"
    assert summary["environment"]["1"]["gpu"] == "NVIDIA H200"
    assert "1 x NVIDIA H200; torch 2.13.0+cu130" in readme
    assert summary["config_overrides"]["tokenizer_path"] == "./data/tokenizers/t.model"
    assert "data_dir" not in summary["config_overrides"]  # ./data/ is the default
    command = summary["reproduce"]["parlm"][0]
    assert command.startswith("python -m parlm.run --nproc 1 --seeds 1 2 --set ")
    assert "--set artifact_cap_bytes=17000000" in command
    assert f"--set num_layers={tiny_config.num_layers}" in command
    assert summary["reproduce"]["train_gpt"][1].startswith("python train_gpt.py seed=2 ")
    assert command in readme and summary["reproduce"]["train_gpt"][0] in readme
    for name in ("README.md", "submission.json", "train_seed1.log", "train_seed2.log"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text, name
    assert "runs/raised/seed_1/final_model.pt" in (out / "train_seed1.log").read_text()
