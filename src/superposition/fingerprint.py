"""Code fingerprints of the rules: the package modules a workflow script reaches, each hashed as its syntax tree.

Snakemake does not see the library code a script imports. Each rule gets one param per module of the transitive
closure of ``superposition`` imports from its script (imports inside functions included, parent packages
included), plus the script itself, rendered as ``"superposition.stats code 1a2b3c4d5e6f"``. A module is hashed as
its abstract syntax tree without docstrings, so comments, docstrings and formatting rerun nothing, while any
change to code reruns exactly the rules whose closure holds that module (and, through their outputs, what reads
them). ``snakemake -n`` then names the module.

Nothing is imported to compute this (only parsed), so it is cheap while Snakemake builds the DAG.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
from pathlib import Path

PACKAGE = "superposition"
PACKAGE_DIR = Path(__file__).resolve().parent


def _statements(nodes):
    """Every statement in ``nodes`` and in the statement lists below them (bodies, else and finally branches,
    handlers, match cases): where imports, functions and classes can be, without visiting any expression."""
    for node in nodes:
        yield node  # first: a caller may replace its body before it is walked
        for name in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(node, name, None) or ())
        for child in getattr(node, "handlers", None) or getattr(node, "cases", None) or ():
            yield from _statements(child.body)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in itertools.chain([tree], _statements(tree.body)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


# One parse per file and process serves both the hash and the import walk (docstrings hold no imports).
@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    """The file's syntax tree without docstrings."""
    return _strip_docstrings(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))


def code_hash(path: str | Path) -> str:
    """sha256 of a Python file's syntax tree without docstrings (comments and layout do not count)."""
    return _code_hash(Path(path).resolve())


# Every rule's params name the same few modules: each file is hashed once per process (one DAG build), not once
# per rule that reaches it (236 hashes for 24 rules took 80% of a dry run).
@functools.lru_cache(maxsize=None)
def _code_hash(path: Path) -> str:
    dump = ast.dump(_parse(path), annotate_fields=True, include_attributes=False)
    return hashlib.sha256(dump.encode()).hexdigest()[:12]


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of ``superposition.x.y`` (a module or a package's ``__init__``), or None if there is none."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# Walking a module's tree for its imports is the other cost of a DAG build: once per module, not once per rule.
@functools.lru_cache(maxsize=None)
def _imports(path: Path, module: str | None) -> frozenset[str]:
    """Package modules imported anywhere in ``path`` (``module`` is its dotted name, for relative imports)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in _statements(_parse(path).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from superposition import stats` imports the module superposition.stats
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name == PACKAGE or name.startswith(PACKAGE + "."))


def closure(script: str | Path, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every package module reachable from ``script`` by imports, with their parent packages, sorted."""
    return list(_closure(Path(script).resolve(), Path(package_dir)))


@functools.lru_cache(maxsize=None)
def _closure(script: Path, package_dir: Path) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = list(_imports(Path(script), None))
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            todo_name = ".".join(parts[:i])
            if todo_name in seen:
                continue
            path = module_file(todo_name, package_dir)
            if path is None:
                continue  # a name imported from a module (a function), not a module
            seen.add(todo_name)
            todo.extend(_imports(path, todo_name))
    return tuple(sorted(seen))


def code_params(script: str | Path, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """One param per module in the script's closure, and one for the script: ``{"code__stats": "... code <hash>"}``."""
    script = Path(script)
    params = {"code__script": f"{script.name} code {code_hash(script)}"}
    for name in closure(script, package_dir):
        params["code__" + name.replace(".", "__")] = f"{name} code {code_hash(module_file(name, package_dir))}"
    return params
