"""The generated submission: minification keeps the program, the build is a deterministic
function of the sources and the config and never touches sources, every script form decodes
to the program, a script carries exactly the switch modules its config uses (the table
`build.SWITCH_MODULES`) and refuses at once a switch it lacks, and the exported records folder
runs standalone (no parlm importable) on tiny CPU configs, with every switch on as well, scoring
what the package scores."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

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
    program = ("import sys\nRESULT = bytes(range(256)) * 3 + '\\u00e9\\n\\'\"'.encode()\n"
               "print(len(RESULT), len(D), sum(map(ord, D)))\n")
    data = "".join(map(chr, range(1, 300))) + "'''\\\r\n'"  # every separator but NUL, quotes, CR
    candidates = build.candidate_scripts(program, data)
    assert set(candidates) == {"plain", "lzma-b85", "lzma-latin1", "brotli-b85", "brotli-latin1"}
    for name, script in candidates.items():
        path = tmp_path / f"{name}.py"
        path.write_bytes(script)
        output = subprocess.run([sys.executable, "-I", str(path)], capture_output=True, text=True, check=True)
        assert output.stdout.split() == [str(256 * 3 + 5), str(len(data)), str(sum(map(ord, data)))], name


@pytest.mark.parametrize("data", [b"'''", b"'", b"''", b"\\", b"\\'", b"\x00" + b"1", b"\x00a", b"\x00", b"\r\n",
                                  b"a'b''c'''d''''", bytes(range(256)) * 2, bytes(reversed(range(256)))])
def test_latin1_literal_reads_back(data):
    """The body of a '''...''' literal in a latin-1 source reads back as the very bytes."""
    source = b"#coding:latin-1\nVALUE='''" + build._latin1_literal(data) + b"'''.encode('latin-1')\n"
    namespace: dict = {}
    exec(compile(source, "literal", "exec"), namespace)
    assert namespace["VALUE"] == data


def _tree_fingerprint(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_build_is_deterministic_and_never_touches_sources(tmp_path):
    """Same sources and settings, same bytes (the seed and the run id are the command line's,
    data paths are portable, so another checkout gives the same script too)."""
    import shutil
    from parlm.config import Config

    # A private copy of the sources (others may edit the shared tree while this runs).
    sources = tmp_path / "src" / "parlm"
    shutil.copytree(build.package_root(), sources, ignore=shutil.ignore_patterns("__pycache__"))
    before = _tree_fingerprint(sources)
    frontier = Config.from_preset("frontier")
    report: dict = {}
    first = build.build_submission_script(frontier, root=sources, report=report, use_cache=False)
    second = build.build_submission_script(frontier.replace(seed=7, run_id="other"), root=sources, use_cache=False)
    assert first == second == build.build_submission_script(frontier)
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
    """The bundle's importer serves its modules and a stand-in for each left-out switch module
    (importable, failing when called), blocks every other parlm module even where the real
    package is importable, and hands the entry its settings and left-out modules."""
    modules = {"parlm": "", "parlm.alpha": "VALUE = 41\n", "parlm.submission": "", "parlm.submission.entry":
               "def main(path, argv, settings, absent):\n from parlm.alpha import VALUE\n"
               " from parlm.beta import helper\n print(VALUE + 1, path.endswith('x.py'), argv, settings, absent)\n"
               " try:\n  helper()\n except RuntimeError as e:\n  print('stand-in', e)\n"
               " try:\n  import parlm.model.gpt\n except ImportError as e:\n  print('blocked', e)\n"}
    program = build.bundle_program(modules, {"parlm", "parlm.submission"}, {"seed": 3}, {"parlm.beta": "tilt_enabled"})
    path = tmp_path / "x.py"
    path.write_text(program)
    output = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True,
                            cwd=REPO_ROOT)  # the real parlm is importable from here, and still unused
    assert output.stdout.splitlines() == [
        "42 True None {'seed': 3} {'parlm.beta': 'tilt_enabled'}",
        "stand-in parlm.beta.helper is not in this train_gpt.py; regenerate it with its switch on "
        "(python -m parlm.submission build)",
        "blocked not in this bundle: parlm.model"]


# ----------------------------------------------------------------------------------------
# The switch modules: which script carries which
def test_switch_table_names_modules_fields_and_switches_off_by_default(tiny_config):
    """Every SWITCH_MODULES entry is a module of the package, its predicate reads Config fields
    only, is false with the PR #1858 defaults and true once its switch is on."""
    from parlm.config import Config

    reference = Config().to_dict()
    every = tiny_config.replace(**every_switch_settings()).to_dict()
    one_off = {"parlm.eval.token_mixture": dict(mixture_enabled=True),  # the tilt excludes it
               "parlm.data.caseops": dict(text_transform="caseops", byte_accounting="sidecar")}
    for module, predicate in build.SWITCH_MODULES.items():
        assert build.module_file(module) is not None, module
        assert build.switch_fields(predicate) <= set(reference), predicate
        assert not build.switch_on(predicate, reference), f"{module}: on with the PR #1858 defaults"
        switched = Config().replace(**one_off[module]).to_dict() if module in one_off else every
        assert build.switch_on(predicate, switched), f"{module}: off with its switch on"


def test_reference_script_carries_no_switch_module():
    """The PR #1858 default script carries none of the switch modules (those the rest still
    imports are stand-ins the entry guards) and no settings; the frontier preset's carries all
    it uses, and runs the preset by default (its data paths portable)."""
    from parlm.config import Config

    report: dict = {}
    build.build_submission_script(report=report)
    assert not set(report["modules"]) & set(build.SWITCH_MODULES)
    assert report["settings"] == {}
    assert {"parlm.eval.lora_ttt", "parlm.eval.ngram_tilt", "parlm.model.gates", "parlm.quant.awq",
            "parlm.quant.lqer", "parlm.quant.compression"} <= set(report["absent"])
    frontier = Config.from_preset("frontier")
    report = {}
    build.build_submission_script(frontier, report=report)
    carried = set(report["modules"]) & set(build.SWITCH_MODULES)
    assert carried == {"parlm.eval.lora_ttt", "parlm.eval.ngram_tilt", "parlm.model.gates", "parlm.quant.awq",
                       "parlm.quant.lqer", "parlm.quant.compression"}
    # Plain SentencePiece data: the byte accounting imports CaseOps, which travels as a stand-in.
    assert report["absent"] == {"parlm.eval.token_mixture": "mixture_enabled",
                                "parlm.data.caseops": "text_transform != 'none'"}
    expected = {**frontier.to_dict(), "data_dir": "./data/",
                "tokenizer_path": "./data/tokenizers/fineweb_8192_bpe.model"}
    assert Config().replace(**report["settings"]).to_dict() == expected


def test_entry_refuses_a_switch_the_script_lacks(tmp_path, capsys):
    """A command line that turns on switches whose modules the script lacks stops in one line
    naming them, and the regeneration command it prints builds a script that carries them."""
    import shlex

    from parlm.config import Config
    from parlm.submission.__main__ import main as submission_main
    from parlm.submission.entry import refuse_absent_switches

    absent = {"parlm.eval.lora_ttt": "lora_ttt_enabled", "parlm.quant.awq": "awq_lite_groups > 0"}
    settings = {"matrix_lr": 0.03}
    refuse_absent_switches(Config().replace(**settings), absent, settings, {"seed": 3})  # nothing to refuse
    overrides = {"awq_lite_groups": 2, "lora_ttt_enabled": True, "seed": 3}
    with pytest.raises(SystemExit) as stop:
        refuse_absent_switches(Config().replace(**settings, **overrides), absent, settings, overrides)
    message = str(stop.value)
    assert message == ("train_gpt.py: error: lora_ttt_enabled=True needs parlm.eval.lora_ttt; awq_lite_groups=2 "
                       "needs parlm.quant.awq, which this script was generated without; regenerate it: python -m "
                       "parlm.submission build --out train_gpt.py --set awq_lite_groups=2 --set lora_ttt_enabled=True "
                       "--set matrix_lr=0.03")
    command = shlex.split(message.split("regenerate it: ")[1])
    assert command[:3] == ["python", "-m", "parlm.submission"]
    assert submission_main([*command[3:5], str(tmp_path / "train_gpt.py"), *command[6:]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"parlm.eval.lora_ttt", "parlm.quant.awq"} <= set(report["modules"])
    assert report["settings"] == {"awq_lite_groups": 2, "lora_ttt_enabled": True, "matrix_lr": 0.03}


# ----------------------------------------------------------------------------------------
# Records folder and the standalone script
RUNNER = textwrap.dedent('''
    import importlib.abc, json, runpy, sys, threading
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
    ran = set()  # the bundled modules that ran a function (import-time code aside)
    def trace(frame, event, arg):
        code = frame.f_code
        if (code.co_flags & 1 and code.co_filename.startswith("parlm/")  # CO_OPTIMIZED: a function
                and code.co_name not in ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")):
            ran.add(code.co_filename[:-len(".py")].replace("/", "."))
    sys.settrace(trace)
    threading.settrace(trace)
    sys.argv = ["train_gpt.py"] + sys.argv[1:]
    try:
        runpy.run_path("train_gpt.py", run_name="__main__")
    finally:
        sys.settrace(None)
        with open("ran.json", "w") as handle:
            json.dump(sorted(ran), handle)
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


def every_switch_settings() -> dict:
    """Every switch of the frontier presets at the tiny test scale (tests/conftest.py
    TINY_MODEL): the settings in which demo-frontier differs from demo (its training and
    quantization switches) and the frontier preset's evaluation switches (LoRA TTT, the n-gram
    tilt), with the progressive context scaled to train_seq_len 32 and AWQ-lite's column groups
    to model_dim 32."""
    from parlm.config import Config

    demo, demo_frontier = Config.from_preset("demo").to_dict(), Config.from_preset("demo-frontier").to_dict()
    fineweb, frontier = Config.from_preset("fineweb").to_dict(), Config.from_preset("frontier").to_dict()
    run_length = ("iterations", "max_wallclock_seconds", "stall_steps")
    settings = {key: value for key, value in demo_frontier.items() if value != demo[key] and key not in run_length}
    settings.update({key: value for key, value in frontier.items()
                     if value != fineweb[key] and key.startswith(("lora_ttt_", "tilt_"))})
    settings.update(train_seq_schedule="16@0.5,32@1.0", seq_change_warmup_steps=2, awq_lite_group_size=16,
                    gptq_calibration_batches=3, mixture_enabled=False)
    return settings


# The standalone scenarios: the PR #1858 defaults, every switch on, the valid token mixture
# (which the tilt excludes).
SCENARIOS = {"pr1858": dict, "every_switch": every_switch_settings, "mixture": lambda: dict(mixture_enabled=True)}


def _run_standalone(name: str, tiny_dataset_config, root: Path) -> SimpleNamespace:
    """Generate the scenario's script for its config, put it in a records folder beside ./data
    (the tiny dataset), run it there with no arguments, the installed parlm blocked and the
    repo off sys.path, and collect what it ran (RUNNER)."""
    config = tiny_dataset_config.replace(quant_passthrough_max_numel=256, val_max_tokens=512, ttt_epochs=1,
                                         ttt_chunk_tokens=256, **SCENARIOS[name]())
    report: dict = {}
    script = build.build_submission_script(config, report=report)
    folder = root / "records"
    build.write_generated_file(folder / "train_gpt.py", script)
    (folder / "data").symlink_to(Path(config.data_dir), target_is_directory=True)
    # One thread, as the package's side of the comparison (the single_thread fixture): the
    # float reduction order of GPTQ and scoring depends on the thread count.
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    environment["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-I", "-c", RUNNER], cwd=folder, env=environment,
                            capture_output=True, text=True, timeout=900)
    ran_file = folder / "ran.json"
    ran = set(json.loads(ran_file.read_text())) if ran_file.exists() else set()
    return SimpleNamespace(config=config, folder=folder, script=script, report=report, result=result, ran=ran,
                           run_dir=folder / "logs" / f"seed_{config.seed}")


@pytest.fixture(scope="module")
def standalone_run(tiny_dataset_config, tmp_path_factory):
    """standalone_run(name): the `_run_standalone` of a SCENARIOS entry, made once per module."""
    runs: dict = {}

    def run(name: str) -> SimpleNamespace:
        if name not in runs:
            runs[name] = _run_standalone(name, tiny_dataset_config, tmp_path_factory.mktemp(name))
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.usefixtures("single_thread")
def test_exported_script_runs_standalone(standalone_run, tmp_path, scenario):
    """The records folder's train_gpt.py, generated for the scenario's config and run with no
    arguments (its defaults are that config), trains, quantizes and scores a tiny CPU config
    with only its embedded modules. The package, given the script's trained weights, writes the
    same artifact bytes and scores the same BPB, every score included (TTT, tilt, mixture)."""
    from parlm.eval.stage import evaluate_run
    from parlm.quant.stage import quantize_run

    run = standalone_run(scenario)
    assert run.result.returncode == 0, run.result.stdout[-3000:] + run.result.stderr[-3000:]
    final = [line for line in run.result.stdout.splitlines() if line.startswith("final ")]
    assert final and "quantized_bpb:" in final[0] and "ttt_bpb:" in final[0]
    quant = json.loads((run.run_dir / "quant.json").read_text())
    assert quant["bytes_code"] == len(run.script) and quant["fits_cap"]
    assert (run.run_dir / "final_model.int6.ptz").stat().st_size == quant["bytes_model"]
    assert json.loads((run.run_dir / "train.json").read_text())["steps"] == run.config.iterations
    assert (run.folder / "train_gpt.py").read_bytes() == run.script  # never written over itself
    package_dir = tmp_path / "package" / f"seed_{run.config.seed}"
    package_dir.mkdir(parents=True)
    for name in ("final_model.pt", "train.json"):
        (package_dir / name).write_bytes((run.run_dir / name).read_bytes())
    quantize_run(run.config, package_dir, code_bytes=len(run.script), statistics=False)
    assert (package_dir / "final_model.int6.ptz").read_bytes() == (run.run_dir / "final_model.int6.ptz").read_bytes()
    package_eval = evaluate_run(run.config, package_dir)
    script_eval = json.loads((run.run_dir / "eval.json").read_text())
    scores = {"pr1858": ["ttt_bpb"], "every_switch": ["ttt_bpb", "tilt_bpb"], "mixture": ["ttt_bpb", "mix_valid_bpb"]}
    for key in ["quantized_bpb", "sliding_bpb", *scores[scenario]]:
        assert key in script_eval and package_eval[key] == script_eval[key], key
    if scenario == "every_switch":
        assert script_eval["ttt_method"] == "lora"
        assert quant["stream_bytes"]["corrections"] > 0  # the LQER / AWQ-lite tensors are counted in bytes_model


@pytest.mark.slow
def test_switch_table_covers_every_switch_only_module(standalone_run):
    """A module that ran only with switches on must be a SWITCH_MODULES entry: the PR #1858
    script carries none that ran in the switched runs but not in its own. And every switch
    module a switched script carries ran there (the table asks for no module in vain)."""
    reference = standalone_run("pr1858")
    switched = [standalone_run(name) for name in ("every_switch", "mixture")]
    assert reference.ran and all(run.ran for run in switched)
    only_with_switches = set().union(*(run.ran for run in switched)) - reference.ran
    carried_anyway = sorted(only_with_switches & set(reference.report["modules"]))
    assert not carried_anyway, (f"{carried_anyway} ran only with switches on, yet the PR #1858 script carries "
                                f"them: add each to parlm.submission.build.SWITCH_MODULES with its predicate")
    for run in switched:
        carried = set(run.report["modules"]) & set(build.SWITCH_MODULES)
        assert carried and carried <= run.ran, carried - run.ran


@pytest.mark.slow
def test_script_stops_at_once_on_a_switch_it_lacks(tmp_path):
    """The PR #1858 script given lora_ttt_enabled=true ends in one line (exit code 1) naming the
    switch and the regeneration command, before anything of training runs."""
    build.write_generated_file(tmp_path / "train_gpt.py", build.build_submission_script())
    result = subprocess.run([sys.executable, "-I", "-c", RUNNER, "lora_ttt_enabled=true", "seed=3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0] == ("train_gpt.py: error: lora_ttt_enabled=True needs parlm.eval.lora_ttt, which this script was "
                        "generated without; regenerate it: python -m parlm.submission build --out train_gpt.py "
                        "--set lora_ttt_enabled=True")
    assert not (tmp_path / "logs").exists()
    assert set(json.loads((tmp_path / "ran.json").read_text())) <= {"parlm.config", "parlm.submission.entry"}


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


def _readme_figures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_figures", REPO_ROOT / "scripts" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_figures_check_each_preset_quote(tmp_path):
    """scripts/readme_figures.py checks every quoted size, the presets' too, and with
    required=all (its --check) says which one no sentence quotes."""
    figures = _readme_figures()
    values = {"bytes_code": 100, "bytes_code_frontier": 2000, "bytes_code_demo_frontier": 3000}
    readme = tmp_path / "README.md"
    readme.write_text("the generated `train_gpt.py` is **100 bytes**, **2,001 bytes** for `--preset frontier`\n")
    problems = figures.check(readme, values, required=tuple(values))
    assert len(problems) == 2
    assert "no sentence quotes bytes_code_demo_frontier" in problems[0] and "`--preset demo-frontier`" in problems[0]
    assert problems[1].endswith("quotes bytes_code_frontier 2,001, the code generates 2,000; write 2,000")


@pytest.mark.slow  # builds three scripts
def test_readme_quotes_every_script_size():
    figures = _readme_figures()
    values = figures.figures()
    assert set(values) == {"bytes_code", "bytes_code_frontier", "bytes_code_demo_frontier"}
    assert figures.check(REPO_ROOT / "README.md", values, required=tuple(values)) == []
