"""The embedded default corpus: the Python standard library's own documentation.

Documents, in a fixed order:
1. one per standard-library module (packages walked into their submodules, sorted by name):
   the module docstring, then the docstring of every public class and function it holds and
   of their public methods and properties, each under its qualified name; an object reachable
   from several modules is documented once, under the first module (in sorted order);
2. one per pydoc topic (`pydoc_data.topics`, the language reference text `help()` shows).

Importing ~400 modules has side effects (warnings, registries, some print), so extraction runs
in a child process: `python -m parlm.data.stdlib_docs OUT.jsonl`. Modules that do something
visible when imported (antigravity opens a browser, `this` prints, GUI toolkits, `__main__`
submodules that run programs) or that write files (lib2to3's grammar cache) are skipped.
The text depends only on the Python version, which the dataset manifest records.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings

SKIPPED_TOP_LEVEL = frozenset({
    "__hello__", "__phello__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "lib2to3", "test", "ensurepip", "readline", "distutils", "msilib", "encodings", "pydoc_data",
    "webbrowser", "site",
})


def wanted(module_name: str) -> bool:
    """Public, non-test, non-__main__ modules outside SKIPPED_TOP_LEVEL."""
    parts = module_name.split(".")
    if parts[0] in SKIPPED_TOP_LEVEL:
        return False
    for part in parts:
        if part.startswith("_") or part in ("test", "tests", "__main__") or part.startswith("test_"):
            return False
    return True


def _quiet_import(name: str):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return importlib.import_module(name)


def _clean(doc) -> str:
    return inspect.cleandoc(doc).strip() if isinstance(doc, str) and doc.strip() else ""


def module_names() -> list[str]:
    """Every wanted standard-library module name, packages expanded, in sorted order."""
    names = set()
    for top in sorted(sys.stdlib_module_names):
        if not wanted(top):
            continue
        try:
            module = _quiet_import(top)
        except BaseException:  # platform-specific or broken modules: not part of the corpus
            continue
        names.add(top)
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda _: None):
                if wanted(info.name):
                    names.add(info.name)
    return sorted(names)


def module_document(name: str, seen: set[int]) -> str:
    """The text of one module's document (see the module docstring); "" if it has none."""
    try:
        module = _quiet_import(name)
    except BaseException:
        return ""
    sections = []
    if _clean(module.__doc__):
        sections.append(f"{name}\n{_clean(module.__doc__)}")
    for attribute, value in sorted(vars(module).items()):
        if attribute.startswith("_") or not (inspect.isclass(value) or inspect.isroutine(value)):
            continue
        origin = str(getattr(value, "__module__", "") or "").split(".")[0]
        if id(value) in seen or origin not in sys.stdlib_module_names:
            continue
        seen.add(id(value))
        if _clean(value.__doc__):
            sections.append(f"{attribute}\n{_clean(value.__doc__)}")
        if inspect.isclass(value):
            for member_name, member in sorted(vars(value).items()):
                if member_name.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    text = _clean(getattr(member, "__doc__", None))
                    if text:
                        sections.append(f"{attribute}.{member_name}\n{text}")
    return "\n\n".join(sections)


def stdlib_documents() -> list[str]:
    """All documents of the corpus, in order (modules, then pydoc topics)."""
    warnings.simplefilter("ignore")
    seen: set[int] = set()
    documents = [module_document(name, seen) for name in module_names()]
    try:
        from pydoc_data.topics import topics
        documents += [f"{key}\n{_clean(topics[key])}" for key in sorted(topics)]
    except ImportError:
        pass
    return [doc for doc in documents if doc.strip()]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m parlm.data.stdlib_docs OUT.jsonl", file=sys.stderr)
        return 2
    documents = stdlib_documents()
    with open(argv[0], "w", encoding="utf-8") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
