"""Generate the single-file submission script from the package sources (DESIGN: readable
source is canonical; the minified submission is generated, never edited, never written over a
source file).

1. Collect the modules `parlm.submission.entry` imports, transitively (imports anywhere in
   a module, package `__init__`s included), minus the areas a submission does not run
   (`EXCLUDED`: PPM, report, plots, pipeline helpers that build data, this generator).
2. Minify each module through its AST, so the result is the same program: drop docstrings,
   function annotations, `if __name__ == "__main__"` blocks and top-level functions/classes
   nothing refers to (by name in their module, as an attribute or string anywhere, or as an
   imported name); `ast.unparse`, one space per indent level, no blank lines.
3. Bundle: a program holding the module sources in a dict, a meta-path importer that serves
   `parlm.*` only from that dict (an installed parlm can never be used), and a call of
   `parlm.submission.entry.main(__file__)`.
4. Write the smallest of: the plain bundle; the bundle compressed (LZMA "alone" format at
   preset 9e over a few literal-context settings, or brotli 11) and wrapped in a one-line
   bootstrap that decodes a Base85 string, or - smaller still - a latin-1 string literal
   holding the compressed bytes directly (PEP 263 source encoding; the 5 bytes that cannot
   appear raw in a string literal are escaped).

The output is a pure function of the sources and the Python version: module order is sorted
and nothing time- or machine-dependent enters.
"""
from __future__ import annotations

import ast
import base64
import lzma
import os
from pathlib import Path

import parlm

from parlm.submission.minify import minify_modules

PACKAGE = "parlm"
ENTRY_MODULE = "parlm.submission.entry"
ENTRY_FUNCTION = "main"
# Modules (and packages, with everything under them) a submission never runs.
EXCLUDED = (
    "parlm.submission.build", "parlm.submission.minify", "parlm.submission.records",
    "parlm.submission.__main__",
    "parlm.ppm", "parlm.eval.token_mixture", "parlm.report", "parlm.quant.plots", "parlm.quant.stats",
    "parlm.train.plots", "parlm.model.plots", "parlm.eval.plots", "parlm.run", "parlm.data.corpus", "parlm.data.stdlib_docs",
    "parlm.data.__main__", "parlm.data.download", "parlm.reference",
)


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


def collect_modules(entry: str = ENTRY_MODULE, root: Path | None = None) -> dict[str, str]:
    """Source text of every module the entry needs (transitively, minus EXCLUDED), by name."""
    root = root or package_root()
    sources: dict[str, str] = {}
    pending = [entry]
    while pending:
        name = pending.pop()
        if name in sources or excluded(name):
            continue
        path = module_file(name, root)
        if path is None:
            raise FileNotFoundError(f"module {name} not found under {root}")
        sources[name] = path.read_text(encoding="utf-8")
        tree = ast.parse(sources[name])
        parents = [".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))]
        pending.extend(sorted(imported_modules(tree, name, is_package(name, root), root) | set(parents)))
    return dict(sorted(sources.items()))


# ----------------------------------------------------------------------------------------
# Bundle and wrappers
BOOTSTRAP = """import sys,importlib.abc as A,importlib.util as U
M={modules}
P={packages}
class L(A.MetaPathFinder,A.Loader):
 def find_spec(s,n,p=None,t=None):
  if n in M:return U.spec_from_loader(n,s,is_package=n in P)
  if n.split('.')[0]=='parlm':raise ImportError('not in this bundle: '+n)
 def create_module(s,p):pass
 def exec_module(s,m):n=m.__name__;m.__file__=n.replace('.','/')+'.py';exec(compile(M[n],m.__file__,'exec'),m.__dict__)
sys.meta_path.insert(0,L())
if __name__=='__main__':
 from {entry} import {function}
 {function}(__file__)
"""


def bundle_program(modules: dict[str, str], packages: set[str]) -> str:
    """The plain single-file program (module docstring, step 3)."""
    body = "{" + ",".join(f"{name!r}:{source!r}" for name, source in sorted(modules.items())) + "}"
    return BOOTSTRAP.format(modules=body, packages=repr(sorted(packages)), entry=ENTRY_MODULE,
                            function=ENTRY_FUNCTION)


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
    """`data` as the body of a single-quoted string literal in a latin-1 source file; only
    backslash, the quote, CR, LF and NUL are escaped."""
    escapes = {0x5C: b"\\\\", 0x27: b"\\'", 0x0A: b"\\n", 0x0D: b"\\r", 0x00: b"\\x00"}
    return b"".join(escapes.get(byte, bytes([byte])) for byte in data)


def candidate_scripts(program: str) -> dict[str, bytes]:
    """Every script form of the program (module docstring, step 4), by name."""
    import brotli

    raw = program.encode("utf-8")
    compressed = {"lzma": (_lzma_alone(raw), "import lzma as C"),
                  "brotli": (brotli.compress(raw, quality=11), "import brotli as C")}
    out = {"plain": raw}
    for name, (data, import_line) in compressed.items():
        out[f"{name}-b85"] = (f"{import_line},base64 as B;exec(C.decompress(B.b85decode("
                              f"'{base64.b85encode(data).decode()}')))\n").encode()
        out[f"{name}-latin1"] = (b"#coding:latin-1\n" + import_line.encode() + b";exec(C.decompress('"
                                 + _latin1_literal(data) + b"'.encode('latin-1')))\n")
    return out


_BUILD_CACHE: dict[str, tuple[bytes, dict]] = {}


def build_submission_script(root: Path | None = None, report: dict | None = None,
                            use_cache: bool = True) -> bytes:
    """The generated `train_gpt.py` bytes: the smallest of `candidate_scripts` (ties broken
    by name). `report`, if given, receives the size of every form and the module list.
    Results are cached in-process by the sha256 of the collected sources (same input, same
    output), so repeated builds cost one source scan."""
    import hashlib

    root = root or package_root()
    sources = collect_modules(ENTRY_MODULE, root)
    key = hashlib.sha256(repr(sorted(sources.items())).encode()).hexdigest()
    if not use_cache or key not in _BUILD_CACHE:
        modules = minify_modules(sources, {ENTRY_MODULE: {ENTRY_FUNCTION}})
        packages = {name for name in modules if is_package(name, root)}
        candidates = candidate_scripts(bundle_program(modules, packages))
        choice = min(sorted(candidates), key=lambda name: len(candidates[name]))
        details = dict(form=choice, sizes={k: len(v) for k, v in sorted(candidates.items())},
                       modules={k: [len(sources[k]), len(modules[k])] for k in modules},
                       source_bytes=sum(len(s.encode()) for s in sources.values()),
                       minified_bytes=sum(len(s.encode()) for s in modules.values()),
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
