"""Minification of module sources through their AST, keeping the program (used by
`parlm.submission.build`):

- drop docstrings and bare string statements, function annotations, the annotations of
  assignments outside classes (class-level ones stay: dataclass fields need them),
  `from __future__ import annotations` where none is left, `if __name__ == "__main__"` blocks;
- `shake`: remove, to a fixpoint, names imported from parlm modules and never used, and
  top-level functions/classes/methods nothing can refer to;
- `rename_locals`: short names for function-local variables whose every use is known;
- `ast.unparse`, then the tokens with the least whitespace (`_squeeze`: one space per
  indentation level, spaces only where two tokens would join, no blank lines), kept only when
  it parses to the same AST.

Functions with decorators outside PURE_DECORATORS are left as written (a decorator may read
annotations, names or source).
"""
from __future__ import annotations

import ast
import builtins
import io
import keyword
import tokenize

# Decorators that only wrap the function (removing an unused decorated def is safe).
PURE_DECORATORS = {"lru_cache", "cache", "no_grad", "inference_mode", "compile", "contextmanager",
                   "dataclass", "staticmethod", "classmethod", "property", "wraps", "cached_property"}


class _Stripper(ast.NodeTransformer):
    """Drop docstrings / bare string statements, function annotations, the annotations of
    assignments outside class bodies (kept there: dataclass fields) and `__main__` blocks."""

    def __init__(self):
        self.function_depth = 0
        self.in_class = False

    def _body(self, statements):
        kept = []
        for statement in statements:
            if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
                    and isinstance(statement.value.value, str):
                continue
            if isinstance(statement, ast.If) and _is_main_guard(statement.test):
                continue
            kept.append(statement)
        return kept or [ast.Pass()]

    def generic_visit(self, node):
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(node, field, None), list) and getattr(node, field) \
                    and isinstance(getattr(node, field)[0], ast.stmt):
                setattr(node, field, self._body(getattr(node, field)))
        return super().generic_visit(node)

    def visit_FunctionDef(self, node):
        if not all(_decorator_name(d) in PURE_DECORATORS for d in node.decorator_list):
            return self.generic_visit(node)  # e.g. a custom op or a JIT: annotations may matter
        node.returns = None
        arguments = node.args
        for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                    arguments.vararg, arguments.kwarg]:
            if arg is not None:
                arg.annotation = None
        self.function_depth += 1
        in_class, self.in_class = self.in_class, False
        node = self.generic_visit(node)
        self.function_depth -= 1
        self.in_class = in_class
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        depth, self.function_depth = self.function_depth, 0
        in_class, self.in_class = self.in_class, True
        node = self.generic_visit(node)
        self.function_depth, self.in_class = depth, in_class
        return node

    def visit_AnnAssign(self, node):
        if self.in_class or node.value is None:
            return node  # a field (dataclasses read it) or a bare declaration (it makes a name local)
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)

    def visit_Module(self, node):
        """Also drop `from __future__ import annotations` when no annotation is left (it then
        changes nothing)."""
        node = self.generic_visit(node)
        annotated = any(isinstance(n, ast.AnnAssign) or getattr(n, "returns", None) is not None
                        or (isinstance(n, ast.arg) and n.annotation is not None) for n in ast.walk(node))
        if not annotated:
            node.body = [statement for statement in node.body if not _is_future_annotations(statement)] or [ast.Pass()]
        return node


def _is_future_annotations(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.ImportFrom) and statement.module == "__future__"
            and [alias.name for alias in statement.names] == ["annotations"])


def _is_main_guard(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _scan(tree: ast.Module) -> dict:
    """One walk of a module: names used as ast.Name ("local"), attribute names and
    identifier-like strings ("reach": how other code may reach its objects), the names it
    imports by `from M import`, per M as written ("imported"), and its classes."""
    local, reach, imported, classes = set(), set(), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            local.add(node.id)
        elif isinstance(node, ast.Attribute):
            reach.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            source = "." * node.level + (node.module or "")
            imported.setdefault(source, set()).update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            reach.add(node.value)
        elif isinstance(node, ast.ClassDef):
            classes.append(node)
    return {"local": local, "reach": reach, "imported": imported, "classes": classes}


def _removable(node: ast.stmt, referenced: set[str]) -> bool:
    return (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("__") and node.name not in referenced
            and all(_decorator_name(d) in PURE_DECORATORS for d in node.decorator_list))


class _ImportPruner(ast.NodeTransformer):
    """Drop names imported from parlm modules (or typing) that the module never uses (as a
    name) and no other code can reach (attribute, string, import from this module); an import
    left empty goes. Importing these modules has no side effects beyond defining them."""

    def __init__(self, used: set[str]):
        self.used = used
        self.changed = False

    def visit_ImportFrom(self, node):
        if not (node.level or (node.module or "").split(".")[0] in ("parlm", "typing")):
            return node
        kept = [a for a in node.names if a.name == "*" or (a.asname or a.name) in self.used]
        self.changed |= len(kept) != len(node.names)
        if not kept:
            return None
        node.names = kept
        return node


def _fill_empty_bodies(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            value = getattr(node, field, None)
            if field == "body" and isinstance(value, list) and not value:
                setattr(node, field, [ast.Pass()])


def shake(trees: dict[str, ast.Module], keep: dict[str, set[str]]) -> None:
    """Remove, to a fixpoint, what nothing refers to: names imported from parlm modules and
    never used; top-level functions and classes whose name appears neither as a name in their
    module, nor as an attribute or string anywhere, nor as a name another module imports from
    theirs (or from any module, through a relative import); methods whose name
    appears nowhere as an attribute or string. `keep` names roots per module. Decorated defs
    are kept unless every decorator is in PURE_DECORATORS; dunder names are always kept."""
    scans = {name: _scan(tree) for name, tree in trees.items()}
    changed = set(trees)
    while changed:
        reach = set().union(*(scan["reach"] for scan in scans.values()))
        changed = set()
        for name, tree in trees.items():
            others = set()  # names other modules import from this one (or from a relative module)
            for other, scan in scans.items():
                if other != name:
                    for source, names in scan["imported"].items():
                        if source == name or source.startswith("."):
                            others |= names
            referenced = scans[name]["local"] | reach | others | keep.get(name, set())
            pruner = _ImportPruner(referenced)
            pruner.visit(tree)
            if pruner.changed:
                _fill_empty_bodies(tree)
                changed.add(name)
            body = [node for node in tree.body if not _removable(node, referenced)]
            if len(body) != len(tree.body):
                changed.add(name)
            tree.body = body or [ast.Pass()]
            for node in scans[name]["classes"]:
                methods = [m for m in node.body if not _removable(m, referenced)]
                if len(methods) != len(node.body):
                    changed.add(name)
                node.body = methods or [ast.Pass()]
        for name in changed:  # the other modules' scans still hold
            scans[name] = _scan(trees[name])


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)
_RESERVED = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls"}


def _own_nodes(scope: ast.AST):
    """Nodes of a scope's own body, not descending into nested scopes (whose defining nodes -
    and, for functions, decorators and defaults - are still yielded)."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, _SCOPES):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.extend(node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d])
            elif isinstance(node, ast.ClassDef):
                stack.extend(node.decorator_list + node.bases + node.keywords)
            elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                stack.append(node.generators[0].iter)  # evaluated in the enclosing scope
            continue
        stack.extend(ast.iter_child_nodes(node))


def _bound_names(scope: ast.AST) -> tuple[set[str], set[str]]:
    """(names bound in the scope itself, names it must keep: parameters, imports, global/
    nonlocal declarations, nested def/class names, walrus targets)."""
    bound, fixed = set(), set()
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        arguments = scope.args
        fixed.update(a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                     arguments.vararg, arguments.kwarg] if a is not None)
    if isinstance(scope, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
        for generator in scope.generators:
            fixed.update(n.id for n in ast.walk(generator.target) if isinstance(n, ast.Name))
    for node in _own_nodes(scope):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            fixed.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            fixed.update(node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            fixed.add(node.name)
        elif isinstance(node, ast.NamedExpr) or type(node).__name__.startswith("Match"):
            fixed.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
    return bound, fixed


def _short_names():
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    yield from letters
    for first in letters:
        for second in letters + "0123456789":
            yield first + second


def rename_locals(tree: ast.Module) -> None:
    """Give every function's own local variables (not parameters, imports, declared globals,
    nested definitions) short names. A name is renamed only if no nested scope binds it too,
    so every reference to it (free references in nested scopes included) is the variable
    renamed; new names avoid every identifier used in the function and all builtins. Functions
    that call locals/vars/eval/exec are left alone."""
    for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        if not all(_decorator_name(d) in PURE_DECORATORS for d in function.decorator_list):
            continue  # a decorator that may read the source or the code object's names
        names_used = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
        if names_used & {"locals", "vars", "eval", "exec"}:
            continue
        bound, fixed = _bound_names(function)
        nested_bound = set()
        for node in ast.walk(function):
            if node is not function and isinstance(node, _SCOPES):
                inner_bound, inner_fixed = _bound_names(node)
                nested_bound |= inner_bound | inner_fixed
        candidates = sorted(bound - fixed - nested_bound - {"__class__"})
        taken = names_used | {a.arg for a in ast.walk(function) if isinstance(a, ast.arg)} | _RESERVED
        fresh = (name for name in _short_names() if name not in taken)
        mapping = {}
        for name in candidates:
            new = next(fresh)
            if len(new) < len(name):
                mapping[name] = new
        if not mapping:
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Name) and node.id in mapping:
                node.id = mapping[node.id]
            elif isinstance(node, ast.ExceptHandler) and node.name in mapping:
                node.name = mapping[node.name]


def _joins(left: tokenize.TokenInfo, right: tokenize.TokenInfo) -> bool:
    """Whether `left` and `right` would read as one token without a space between them: two
    identifier characters meet (names, keywords, numbers), or a number meets a dot or a letter."""
    last, first = left.string[-1], right.string[0]
    return (("a" + last).isidentifier() and ("a" + first).isidentifier()) or (
        left.type == tokenize.NUMBER and (first == "." or first.isalpha()))


def _squeeze(source: str) -> str:
    """The same tokens with the least whitespace: one space per indentation level, one space
    between two tokens only where they would otherwise join (`_joins`), no blank lines or
    comments; multi-line strings are single tokens and stay as they are."""
    out, depth, previous = [], 0, None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.INDENT:
            depth += 1
        elif token.type == tokenize.DEDENT:
            depth -= 1
        elif token.type == tokenize.NEWLINE:
            out.append("\n")
            previous = None
        elif token.type not in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER):
            if previous is None:
                out.append(" " * depth)
            elif _joins(previous, token):
                out.append(" ")
            out.append(token.string)
            previous = token
    return "".join(out)


def _layout(source: str) -> str:
    """`_squeeze(source)` when it parses to the same AST as `source` (it always should; the
    check makes it certain), else `_reindent(source)`."""
    squeezed = _squeeze(source)
    try:
        if ast.dump(ast.parse(squeezed)) == ast.dump(ast.parse(source)):
            return squeezed
    except SyntaxError:
        pass
    return _reindent(source)


def _reindent(source: str) -> str:
    """One space per indentation level (ast.unparse writes four) and no blank lines; lines
    inside multi-line string tokens are left alone."""
    protected = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING and token.end[0] > token.start[0]:
            protected.update(range(token.start[0] + 1, token.end[0] + 1))
        elif token.type == getattr(tokenize, "FSTRING_MIDDLE", -1) and token.end[0] > token.start[0]:
            protected.update(range(token.start[0] + 1, token.end[0] + 1))
    lines = []
    for number, line in enumerate(source.split("\n"), start=1):
        if number in protected:
            lines.append(line)
            continue
        if not line.strip():
            continue
        stripped = line.lstrip(" ")
        lines.append(" " * ((len(line) - len(stripped)) // 4) + stripped)
    return "\n".join(lines) + "\n"


def minify_modules(sources: dict[str, str], roots: dict[str, set[str]]) -> dict[str, str]:
    """The minified source of every module (same program, see the module docstring); `roots`
    names, per module, the top-level objects that must stay (the entry point)."""
    trees = {name: _Stripper().visit(ast.parse(source)) for name, source in sources.items()}
    shake(trees, roots)
    for tree in trees.values():
        rename_locals(tree)
    out = {}
    for name, tree in trees.items():
        text = _layout(ast.unparse(ast.fix_missing_locations(tree)))
        compile(text, name, "exec")  # the minified module must still be valid Python
        out[name] = text
    return out
