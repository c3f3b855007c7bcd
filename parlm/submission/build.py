"""Generate the single-file submission script of one config from the package sources
(DESIGN: readable source is canonical; the minified submission is generated, never edited,
never written over a source file).

1. Collect the modules `parlm.submission.entry` imports, transitively (imports anywhere in
   a module, package `__init__`s included), minus the areas a submission does not run
   (`EXCLUDED`: PPM, report, plots, pipeline helpers that build data, this generator) and
   minus the switch modules (`SWITCH_MODULES`) whose switch the config leaves off. A package
   whose own names no module imports (`package_namespaces_in_use`) travels with an empty
   `__init__`.
2. Minify each module through its AST, so the result is the same program
   (parlm.submission.minify): drop docstrings, annotations, `if __name__ == "__main__"`
   blocks and top-level functions/classes nothing refers to (by name in their module, as an
   attribute or string anywhere, or as a name imported from their module); `ast.unparse`,
   then only the spaces the tokens need. A module that no kept import names any more is
   left out.
3. Bundle: the module texts in one string D (`bundle_parts`), and a program with a
   meta-path importer that serves `parlm.*` only from D (an installed parlm can never be
   used), a stand-in for each left-out switch module that the bundle still imports (its names
   exist; calling one fails), and a call of `parlm.submission.entry.main(__file__, None,
   SETTINGS, ABSENT)`: SETTINGS is the config (`script_settings`: the fields that differ from
   the reference's defaults), which the command line's KEY=VALUE pairs override; ABSENT maps
   each left-out switch module to its predicate, so that turning its switch on at the command
   line fails at once.
4. Write the smallest of: the plain bundle (`D = <literal>` and the program); D and the
   program compressed together (LZMA "alone" format at preset 9e over a few literal-context
   settings, or brotli 11) behind a one-line bootstrap that decodes a Base85 string or -
   smaller still - a latin-1 triple-quoted string literal holding the compressed bytes
   directly (PEP 263 source encoding; only the few bytes that cannot appear raw there are
   escaped).

The output is a pure function of the sources, the config's settings and the Python version:
module order is sorted and nothing time- or machine-dependent enters (data paths are made
portable, the seed and the run id are left to the command line).
"""
from __future__ import annotations

import ast
import base64
import lzma
import os
from pathlib import Path
from typing import Collection

import parlm

from parlm.config import PRESET_PATH_KEYS, PROJECT_ROOT, Config
from parlm.submission.minify import minify_modules

PACKAGE = "parlm"
ENTRY_MODULE = "parlm.submission.entry"
ENTRY_FUNCTION = "main"
# Modules (and packages, with everything under them) a submission never runs.
EXCLUDED = (
    "parlm.submission.build", "parlm.submission.minify", "parlm.submission.records",
    "parlm.submission.__main__",
    "parlm.ppm", "parlm.report", "parlm.quant.plots", "parlm.quant.stats",
    "parlm.train.plots", "parlm.model.plots", "parlm.eval.plots", "parlm.run", "parlm.data.corpus", "parlm.data.stdlib_docs",
    "parlm.data.__main__", "parlm.data.download", "parlm.reference",
)
# The switch modules: module -> predicate, a Python expression over Config fields
# (`switch_on`) that holds when the config uses the module. A script carries a switch module
# only when its predicate holds for the script's config; otherwise the script refuses a
# command line that makes it hold (parlm.submission.entry). Each predicate is false with its
# switch off (the PR #1858 behaviour). The switches that have no module of their own (the
# progressive context, Polar Express, MIN_LR, the clip sigmas, ...) are code inside modules
# every script carries.
SWITCH_MODULES: dict[str, str] = {
    "parlm.model.gates": "sparse_attn_gate_enabled or smear_gate_enabled or asym_logit_rescale",
    "parlm.quant.awq": "awq_lite_groups > 0",
    "parlm.quant.lqer": "lqer_top_k > 0",
    "parlm.quant.compression": "compressor == 'per_group'",
    "parlm.eval.lora_ttt": "lora_ttt_enabled",
    "parlm.eval.ngram_tilt": "tilt_enabled",
    "parlm.eval.token_mixture": "mixture_enabled",
    "parlm.data.caseops": "text_transform != 'none'",
}
# Config fields that name a run rather than configure it: left to the script's command line,
# so one script serves every seed of a run (as the challenge's `SEED=42 torchrun train_gpt.py`).
RUN_IDENTITY_FIELDS = ("seed", "run_id")


def switch_on(predicate: str, values: dict) -> bool:
    """The value of a SWITCH_MODULES predicate for the config field values `values`
    (`Config.to_dict()`), evaluated with no builtins."""
    return bool(eval(compile(predicate, "<switch predicate>", "eval"), {"__builtins__": {}}, dict(values)))


def switch_fields(predicate: str) -> set[str]:
    """The Config fields a predicate reads (the names in it)."""
    return {node.id for node in ast.walk(ast.parse(predicate, mode="eval")) if isinstance(node, ast.Name)}


def portable_path(value: str, data_dir: str) -> str:
    """A data path without the machine's folders: `./data/<rest>` for a path inside `data_dir`
    (data_dir itself is `./data/`), a path inside the checkout relative to it, else
    `./data/<file name>`: the challenge's layout, which the README asks the reader to provide."""
    if not value:
        return value
    path, data = Path(os.path.abspath(value)), Path(os.path.abspath(data_dir))
    for base, prefix in ((data, "./data"), (PROJECT_ROOT, ".")):
        try:
            rest = path.relative_to(base).as_posix()
        except ValueError:
            continue
        return f"{prefix}/" if rest == "." else f"{prefix}/{rest}"
    return f"./data/{path.name}"


def portable_overrides(config: Config) -> dict:
    """The settings of `config` that differ from Config()'s defaults (the seed left out), with
    its data paths made portable (`portable_path`)."""
    defaults = Config().to_dict()
    values = config.to_dict()
    changed = {k: v for k, v in values.items() if k != "seed" and v != defaults[k]}
    for key in PRESET_PATH_KEYS:
        if key in changed:
            changed[key] = portable_path(str(changed[key]), str(values["data_dir"]))
    return {k: v for k, v in changed.items() if v != defaults[k]}


def script_settings(config: Config | None) -> dict:
    """The settings a script is generated for, which it runs by default: `portable_overrides`
    of `config` without RUN_IDENTITY_FIELDS, by name ({} for None: the reference's defaults)."""
    overrides = portable_overrides(config) if config is not None else {}
    return {key: overrides[key] for key in sorted(overrides) if key not in RUN_IDENTITY_FIELDS}


def switches_off(settings: dict) -> dict[str, str]:
    """The SWITCH_MODULES entries whose predicate is false for Config().replace(**settings)."""
    values = Config().replace(**settings).to_dict()
    return {module: predicate for module, predicate in SWITCH_MODULES.items() if not switch_on(predicate, values)}


def package_root() -> Path:
    return Path(parlm.__file__).resolve().parent


def excluded(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in EXCLUDED)


def module_file(name: str, root: Path | None = None) -> Path | None:
    """Source file of module `name` ("parlm.x.y" -> x/y.py or x/y/__init__.py), None if absent."""
    root = root or package_root()
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def is_package(name: str, root: Path | None = None) -> bool:
    path = module_file(name, root)
    return path is not None and path.name == "__init__.py"


def imported_modules(tree: ast.AST, name: str, package: bool, root: Path) -> set[str]:
    """parlm modules imported anywhere in a module (absolute or relative imports); for
    `from P import x`, P.x when that is a module, and P itself."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = name.split(".") if package else name.split(".")[:-1]
                base_parts = base_parts[:len(base_parts) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if module_file(f"{base}.{alias.name}", root) is not None)
    result = set()
    for module in found:
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            parts = module.split(".")
            result.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in result if module_file(m, root) is not None}


def collect_modules(entry: str = ENTRY_MODULE, root: Path | None = None,
                    absent: Collection[str] = ()) -> dict[str, str]:
    """Source text of every module the entry needs (transitively, minus EXCLUDED and the
    modules named in `absent`, whose imports are not followed either), by name."""
    root = root or package_root()
    sources: dict[str, str] = {}
    pending = [entry]
    while pending:
        name = pending.pop()
        if name in sources or excluded(name) or name in absent:
            continue
        path = module_file(name, root)
        if path is None:
            raise FileNotFoundError(f"module {name} not found under {root}")
        sources[name] = path.read_text(encoding="utf-8")
        tree = ast.parse(sources[name])
        pending.extend(sorted(imported_modules(tree, name, is_package(name, root), root) | set(_parents(name))))
    return dict(sorted(sources.items()))


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_closure(modules: dict[str, str], entry: str, root: Path) -> set[str]:
    """Names of the modules `entry` reaches through the imports in `modules`' texts (parent
    packages included); a name outside `modules` is reached but not followed."""
    reached, pending = set(), [entry]
    while pending:
        name = pending.pop()
        if name in reached:
            continue
        reached.add(name)
        if name in modules:
            tree = ast.parse(modules[name])
            pending.extend(imported_modules(tree, name, is_package(name, root), root) | set(_parents(name)))
    return reached


def package_namespaces_in_use(sources: dict[str, str], root: Path) -> set[str]:
    """The packages among `sources` whose own names (what their `__init__` defines, e.g.
    parlm.data's lazy exports) bundled code may reach: a `from P import x` of a name that is
    no submodule of P, or a `from parent import leaf` that binds P itself. Any `import parlm...`
    statement or relative import could reach every package, so it counts for all. Code reaches
    the other packages only as the parents of the modules it imports."""
    packages = {name for name in sources if is_package(name, root)}
    used = set()
    for tree in (ast.parse(text) for text in sources.values()):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == PACKAGE for alias in node.names):
                return packages
            if isinstance(node, ast.ImportFrom) and node.level:
                return packages
            if isinstance(node, ast.ImportFrom):
                names = {f"{node.module}.{alias.name}" for alias in node.names}
                used.update(names)  # `from parent import leaf` binds the package parent.leaf
                if node.module in packages and any(module_file(name, root) is None for name in names):
                    used.add(node.module)  # `from P import x`, x defined by P's __init__
    return used & packages


# ----------------------------------------------------------------------------------------
# Bundle and wrappers
# The module texts travel as one string D: "name\x02source" entries joined by "\x01" (no
# escaping, which compresses better than a dict literal of quoted strings).
MODULE_SEPARATOR, NAME_SEPARATOR, PROGRAM_SEPARATOR = "\x01", "\x02", "\x00"
BOOTSTRAP = """import sys,importlib.abc as A,importlib.util as U
M=dict(m.split('\\2',1)for m in D.split('\\1')if m)
P={packages}
S={settings}
Z={absent}
for n in Z:M[n]={stand_in!r}
class L(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  if n in M:return U.spec_from_loader(n,s,is_package=n in P)
  if n.split('.')[0]=='parlm':raise ImportError('not in this bundle: '+n)
 def create_module(s,p):pass
 def exec_module(s,m):n=m.__name__;m.__file__=n.replace('.','/')+'.py';exec(compile(M[n],m.__file__,'exec'),m.__dict__)
sys.meta_path.insert(0,L())
if __name__=='__main__':
 from {entry} import {function}
 {function}(__file__,None,S,Z)
"""
# The source of a left-out switch module that the bundle still imports (e.g. at the top of
# parlm.model.gpt): every name exists, so the import succeeds; calling one fails. The entry
# refuses a config that turns the switch on before anything runs, so none is ever called.
STAND_IN = """def __getattr__(n):
 if n[:2]=='__':raise AttributeError(n)
 def f(*a,**k):raise RuntimeError(__name__+'.'+n+' is not in this train_gpt.py; regenerate it with its switch on (python -m parlm.submission build)')
 return f
"""


def bundle_parts(modules: dict[str, str], packages: set[str], settings: dict | None = None,
                 absent: dict[str, str] | None = None) -> tuple[str, str]:
    """(D, program) of the bundle (module docstring, step 3): D holds the module texts, the
    program reads them from the global D and runs the entry with `settings` (the Config
    fields it starts from) and `absent` (the left-out switch modules, module -> predicate,
    served as STAND_IN)."""
    separators = (MODULE_SEPARATOR, NAME_SEPARATOR, PROGRAM_SEPARATOR)
    for name, source in modules.items():
        if any(mark in name + source for mark in separators):
            raise ValueError(f"{name} holds a control character the bundle uses as a separator")
    data = MODULE_SEPARATOR.join(f"{name}{NAME_SEPARATOR}{source}" for name, source in sorted(modules.items()))
    program = BOOTSTRAP.format(packages=repr(sorted(packages)), settings=_literal(settings), absent=_literal(absent),
                               stand_in=STAND_IN, entry=ENTRY_MODULE, function=ENTRY_FUNCTION)
    return data, program


def _literal(mapping: dict | None) -> str:
    """A dict literal with its keys sorted (the same text for the same mapping)."""
    return "{" + ",".join(f"{key!r}:{value!r}" for key, value in sorted((mapping or {}).items())) + "}"


def bundle_program(modules: dict[str, str], packages: set[str], settings: dict | None = None,
                   absent: dict[str, str] | None = None) -> str:
    """The plain single-file program: `D = <the module texts>` and the bundle's program."""
    data, program = bundle_parts(modules, packages, settings, absent)
    return f"D={data!r}\n{program}"


def _lzma_alone(data: bytes) -> bytes:
    """Smallest LZMA "alone" stream over a few literal-context settings (lzma.decompress
    reads the settings from the stream header)."""
    candidates = []
    for lc, lp, pb in ((3, 0, 2), (4, 0, 0), (3, 0, 0), (2, 0, 0), (1, 0, 0), (0, 0, 0)):
        filters = [{"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": lp, "pb": pb,
                    "dict_size": 1 << 22}]
        candidates.append(lzma.compress(data, format=lzma.FORMAT_ALONE, filters=filters))
    return min(candidates, key=len)


def _latin1_literal(data: bytes) -> bytes:
    """`data` as the body of a triple-single-quoted string literal in a latin-1 source file:
    only backslash, CR (the tokenizer would read it as LF) and NUL (not allowed in source) are
    escaped, and a quote that another quote follows or that ends the data (so no three raw
    quotes meet and the closing ones stay last)."""
    out = bytearray()
    for index, byte in enumerate(data):
        following = data[index + 1] if index + 1 < len(data) else None
        if byte == 0x5C:
            out += b"\\\\"
        elif byte == 0x0D:
            out += b"\\r"
        elif byte == 0x00:  # \0 unless an octal digit follows, which would extend it
            out += b"\\x00" if following is not None and 0x30 <= following <= 0x37 else b"\\0"
        elif byte == 0x27 and following in (0x27, None):
            out += b"\\'"
        else:
            out.append(byte)
    return bytes(out)


def candidate_scripts(program: str, data: str = "") -> dict[str, bytes]:
    """Every script form (module docstring, step 4), by name: each binds the global D to
    `data` and runs `program`. The compressed forms decode `data + NUL + program` and split it
    at the first NUL."""
    import brotli

    if PROGRAM_SEPARATOR in data:
        raise ValueError("the data of a script must not hold NUL, its separator from the program")
    raw = (data + PROGRAM_SEPARATOR + program).encode("utf-8")
    compressed = {"lzma": (_lzma_alone(raw), "import lzma as C"),
                  "brotli": (brotli.compress(raw, quality=11), "import brotli as C")}
    run = ").decode().partition('\\0');exec(E)\n"
    out = {"plain": f"D={data!r}\n{program}".encode("utf-8")}
    for name, (blob, import_line) in compressed.items():
        out[f"{name}-b85"] = (f"{import_line},base64 as B;D,_,E=C.decompress(B.b85decode("
                              f"'{base64.b85encode(blob).decode()}'){run}").encode()
        out[f"{name}-latin1"] = (b"#coding:latin-1\n" + import_line.encode() + b";D,_,E=C.decompress('''"
                                 + _latin1_literal(blob) + b"'''.encode('latin-1')" + run.encode())
    return out


_BUILD_CACHE: dict[str, tuple[bytes, dict]] = {}
_MINIFIED_CACHE: dict[str, dict[str, str]] = {}  # configs with the same switch modules share it


def bundled_modules(sources: dict[str, str], root: Path, use_cache: bool = True) -> dict[str, str]:
    """The minified modules the script carries: `minify_modules` of `sources`, less those the
    entry no longer imports (`imported_closure`: minification may have removed a module's
    only import). What a dropped module referred to may stay: conservative, and one pass.
    Cached in-process by the sha256 of `sources`."""
    import hashlib

    key = hashlib.sha256(repr(sorted(sources.items())).encode()).hexdigest()
    if not use_cache or key not in _MINIFIED_CACHE:
        minified = minify_modules(sources, {ENTRY_MODULE: {ENTRY_FUNCTION}})
        reached = imported_closure(minified, ENTRY_MODULE, root)
        _MINIFIED_CACHE[key] = {name: text for name, text in minified.items() if name in reached}
    return dict(_MINIFIED_CACHE[key])


def build_submission_script(config: Config | None = None, root: Path | None = None, report: dict | None = None,
                            use_cache: bool = True) -> bytes:
    """The generated `train_gpt.py` bytes for `config` (None: the reference's defaults): the
    smallest of `candidate_scripts` (ties broken by name), carrying the switch modules its
    switches use and running `script_settings(config)` by default. `report`, if given,
    receives the size of every form, the module list, the settings and the left-out switch
    modules. Results are cached in-process by the sha256 of the collected sources and the
    settings (same input, same output), so repeated builds cost one source scan, and the
    minified modules by the sources alone."""
    import hashlib

    root = root or package_root()
    settings = script_settings(config)
    off = switches_off(settings)
    sources = collect_modules(ENTRY_MODULE, root, absent=off)
    in_use = package_namespaces_in_use(sources, root)
    # A package nothing reaches by name is only a parent: its __init__ travels empty.
    sources = {name: text if name in in_use or not is_package(name, root) else "" for name, text in sources.items()}
    key = hashlib.sha256(repr((sorted(sources.items()), sorted(settings.items()))).encode()).hexdigest()
    if not use_cache or key not in _BUILD_CACHE:
        modules = bundled_modules(sources, root, use_cache)
        reached = imported_closure(modules, ENTRY_MODULE, root)
        absent = {module: predicate for module, predicate in off.items() if module in reached}
        packages = {name for name in modules if is_package(name, root)}
        data, program = bundle_parts(modules, packages, settings, absent)
        candidates = candidate_scripts(program, data)
        choice = min(sorted(candidates), key=lambda name: len(candidates[name]))
        details = dict(form=choice, sizes={k: len(v) for k, v in sorted(candidates.items())},
                       modules={k: [len(sources[k]), len(modules[k])] for k in modules},
                       source_bytes=sum(len(sources[k].encode()) for k in modules),
                       minified_bytes=sum(len(s.encode()) for s in modules.values()),
                       settings=settings, absent=absent, switch_modules_off=sorted(off),
                       sources_sha256=key)
        _BUILD_CACHE[key] = (candidates[choice], details)
    script, details = _BUILD_CACHE[key]
    if report is not None:
        report.update(details)
    return script


def write_generated_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write generated code to `path` (atomically), refusing any path inside the package
    source tree, so a source file can never be overwritten (SPEC 8.1)."""
    path = Path(path).resolve()
    root = package_root()
    if path == root or root in path.parents:
        raise ValueError(f"refusing to write generated code to {path}: it is inside the parlm sources {root}")
    from parlm.runlog import atomic_write_bytes

    atomic_write_bytes(path, data)
    return path
