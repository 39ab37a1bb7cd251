"""The raise-site audit: is every ``raise`` in the library reached by a test that checks its message?

It has three parts, all in this file:

* ``raise_sites()`` lists every ``raise`` statement in ``src/superposition/**/*.py`` from the AST: file, line,
  function, exception. A site's key is ``file::function::exception#n`` (n counts the raises of that exception in
  that function), so it survives edits that only move lines.
* A pytest plugin (this module; ``-p raise_audit`` with tests/ on the path) wraps ``pytest.raises``: when a ``with pytest.raises(...)`` block catches
  an exception whose traceback ends on a library ``raise`` line, it records the site, the test and how the test
  checked the message: ``match=`` (a non-empty pattern) or, in the test's own code, ``str(err.value)``,
  ``err.value.args``, ``err.match(...)`` or ``f"{err.value}"`` on the ``as`` name. A raise that is caught
  without a message check (or only inside a Snakemake subprocess) does not count.
* The command (``.venv/bin/python tests/raise_audit.py --run``) runs the whole suite under ``coverage`` with the
  plugin, then classifies every site: *checked* (a test caught it and checked its message), *executed* (coverage
  saw the line run, no test checked its message), *unreached*; it writes the result to docs/raise_audit.json and
  renders docs/raise_sites.md (``--write``). Without ``--run`` it reports from the recorded result (and
  ``--write`` re-renders the page). ``--run --merge --write tests/test_x.py`` runs some tests only and keeps the
  record's other checked sites: for a new test, without the whole suite. Exit status 1 while a site is neither
  checked nor allow-listed.

``tests/test_raise_audit.py`` (part of the normal suite, well under a second) fails when a raise site in the source
is neither recorded as checked nor in ``ALLOWED`` below (each entry with its reason), when an allow-list entry names
no site, when a recorded test no longer exists, and when docs/raise_sites.md is not the rendered record; it also
checks the plugin's attribution on a real library raise. The full audit is a separate command because it is the
whole suite under coverage; the suite itself only reads its record, so the suite's time does not grow.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "superposition"
RECORD = ROOT / "docs" / "raise_audit.json"
DOC = ROOT / "docs" / "raise_sites.md"
HITS_ENV = "RAISE_AUDIT_HITS"

# Sites no test can or should reach with a message check, each with its reason.
ALLOWED: dict[str, str] = {
    "src/superposition/stats.py::KeyHooks._hook.hook::StopForward#1":
        "control flow, not an error: the hook stops the forward pass after the last analysed layer and "
        "KeyHooks.forward catches it; every statistics test runs it (coverage)",
    "src/superposition/provenance.py::atomic_path::(re-raise)#1":
        "re-raises an OSError that is not a known write failure (or is already an ArtifactWriteError) unchanged: "
        "the message is the original error's; tests/test_raise_sites.py checks it passes through unchanged",
    "src/superposition/editing.py::Method.update::NotImplementedError#1":
        "the abstract update of the editing methods: every single-layer method (ClosedForm, NullSpace, Control) "
        "overrides it and Memit overrides edit instead, so no method object reaches it",
    "src/superposition/provenance.py::read_json::(re-raise)#1":
        "re-raises FileNotFoundError unchanged (its message names the missing file); "
        "tests/test_raise_sites.py checks it passes through unchanged",
}


@dataclass(frozen=True)
class Site:
    key: str
    path: str  # relative to the repository root
    line: int
    end_line: int
    function: str
    exception: str


def _exception_name(node: ast.Raise) -> str:
    if node.exc is None:
        return "(re-raise)"
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    return ast.unparse(exc)


def file_sites(path: Path, rel: str | None = None) -> list[Site]:
    """The raise statements of one file; ``rel``: the name keys use (default: the path from the repository root)."""
    rel = rel or path.resolve().relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    sites: list[Site] = []
    counts: dict[tuple[str, str], int] = {}

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + (child.name,))
                continue
            if isinstance(child, ast.Raise):
                function = ".".join(scope) or "(module)"
                exception = _exception_name(child)
                n = counts[function, exception] = counts.get((function, exception), 0) + 1
                sites.append(Site(f"{rel}::{function}::{exception}#{n}", rel, child.lineno,
                                  child.end_lineno or child.lineno, function, exception))
            visit(child, scope)

    visit(tree, ())
    return sorted(sites, key=lambda s: s.line)


def raise_sites() -> list[Site]:
    return [site for path in sorted(SRC.rglob("*.py")) for site in file_sites(path)]


def site_at(sites_by_path: dict[str, list[Site]], path: str, line: int) -> Site | None:
    for site in sites_by_path.get(path, ()):
        if site.line <= line <= site.end_line:
            return site
    return None


# ---------------------------------------------------------------------------------------------------------------
# The pytest plugin
# ---------------------------------------------------------------------------------------------------------------

_hits: list[dict] = []
_current_test: list[str] = ["(collection)"]


def origin(exc: BaseException) -> tuple[str, int] | None:
    """The library file (relative to the root) and line where ``exc`` was raised, if it was raised in the library:
    the last entry of its traceback."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    try:
        filename.relative_to(SRC)
    except ValueError:
        return None
    return filename.relative_to(ROOT).as_posix(), tb.tb_lineno


def record_hit(exc: BaseException, match, caller: tuple[str, int], test: str) -> dict | None:
    where = origin(exc)
    if where is None:
        return None
    hit = {"path": where[0], "line": where[1], "type": type(exc).__name__, "test": test,
           "match": match if isinstance(match, str) else getattr(match, "pattern", None),
           "caller": list(caller)}
    _hits.append(hit)
    return hit


class _Recording:
    """A ``pytest.raises`` context that records the site of the exception it caught."""

    def __init__(self, inner, match, caller):
        self._inner, self._match, self._caller = inner, match, caller

    def __enter__(self):
        return self._inner.__enter__()

    def __exit__(self, exc_type, exc, tb):
        suppressed = self._inner.__exit__(exc_type, exc, tb)
        if suppressed and exc is not None:
            record_hit(exc, self._match, self._caller, _current_test[0])
        return suppressed

    def __getattr__(self, name):
        return getattr(self._inner, name)


def wrap_raises(original):
    def raises(*args, **kwargs):
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        result = original(*args, **kwargs)
        if len(args) > 1:  # the function form: pytest.raises(Error, func, *args) returns the ExceptionInfo
            record_hit(result.value, kwargs.get("match"), caller, _current_test[0])
            return result
        return _Recording(result, kwargs.get("match"), caller)

    raises.__wrapped__ = original
    raises.__doc__ = original.__doc__
    return raises


_sites_at_start: list[Site] = []


def pytest_configure(config):
    import pytest

    # the sites of the code this session imports: lines stay right even if a file is edited during the run
    _sites_at_start[:] = raise_sites()
    if not hasattr(pytest.raises, "__wrapped__"):
        pytest.raises = wrap_raises(pytest.raises)


def pytest_runtest_protocol(item, nextitem):
    _current_test[0] = item.nodeid


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get(HITS_ENV)
    if target:
        Path(target).write_text(json.dumps({"hits": _hits, "exitstatus": int(exitstatus),
                                            "sites": [asdict(site) for site in _sites_at_start],
                                            "tests": session.testscollected, "failed": session.testsfailed}))


# ---------------------------------------------------------------------------------------------------------------
# How a test checked the message
# ---------------------------------------------------------------------------------------------------------------

_trees: dict[str, ast.Module] = {}


def _enclosing_function(tree: ast.Module, line: int):
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= line <= node.end_lineno:
            if best is None or node.lineno >= best.lineno:
                best = node
    return best


def _inspects_message(function: ast.AST, name: str) -> bool:
    def is_value(node):  # err.value
        return (isinstance(node, ast.Attribute) and node.attr == "value" and isinstance(node.value, ast.Name)
                and node.value.id == name)

    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "match" and isinstance(node.func.value,
                                                                                                  ast.Name)
                    and node.func.value.id == name):
                return True
            if isinstance(node.func, ast.Name) and node.func.id in ("str", "repr") and node.args \
                    and is_value(node.args[0]):
                return True
        if isinstance(node, ast.Attribute) and node.attr == "args" and is_value(node.value):
            return True
        if isinstance(node, ast.FormattedValue) and is_value(node.value):
            return True
    return False


def message_check(hit: dict) -> str | None:
    """How the test behind ``hit`` checked the message (``match=<pattern>`` or ``str(err.value)``), or None."""
    if hit.get("match"):
        return f"match={hit['match']!r}"
    filename, line = hit["caller"]
    if filename not in _trees:
        try:
            _trees[filename] = ast.parse(Path(filename).read_text())
        except (OSError, SyntaxError):
            return None
    function = _enclosing_function(_trees[filename], line)
    if function is None:
        return None
    for node in ast.walk(function):
        if isinstance(node, (ast.With, ast.AsyncWith)) and node.lineno <= line <= node.end_lineno:
            for item in node.items:
                if (item.context_expr.lineno <= line <= item.context_expr.end_lineno
                        and isinstance(item.optional_vars, ast.Name)
                        and _inspects_message(function, item.optional_vars.id)):
                    return f"str({item.optional_vars.id}.value)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------------------------

def classify(sites: list[Site], hits: list[dict], executed: dict[str, set[int]] | None) -> dict:
    by_path: dict[str, list[Site]] = {}
    for site in sites:
        by_path.setdefault(site.path, []).append(site)
    checked: dict[str, list[dict]] = {}
    caught: set[str] = set()
    for hit in hits:
        site = site_at(by_path, hit["path"], hit["line"])
        if site is None:
            continue
        caught.add(site.key)
        how = message_check(hit)
        if how is not None:
            checked.setdefault(site.key, []).append({"test": hit["test"], "check": how})
    out = {}
    for site in sites:
        entry = {"path": site.path, "line": site.line, "function": site.function, "exception": site.exception}
        if site.key in checked:
            tests = sorted({(c["test"], c["check"]) for c in checked[site.key]})
            entry.update(status="checked", n_tests=len(tests), test=tests[0][0], check=tests[0][1])
        elif executed is not None and (set(range(site.line, site.end_line + 1)) & executed.get(site.path, set())):
            entry["status"] = "caught, message not checked" if site.key in caught else "executed"
        else:
            entry["status"] = "caught, message not checked" if site.key in caught else "unreached"
        out[site.key] = entry
    return out


def summary(record: dict, sites: list[Site]) -> dict:
    """The audit's numbers for the current sites (by key) against a record; ``failing``: sites neither checked nor
    allow-listed (a site the record does not know counts as unchecked: rerun the audit)."""
    statuses = {s.key: record["sites"].get(s.key, {}).get("status", "not in the record") for s in sites}
    checked = [k for k, status in statuses.items() if status == "checked"]
    allowed = [k for k, status in statuses.items() if status != "checked" and k in ALLOWED]
    return {"total": len(sites), "checked": len(checked), "allowed": len(allowed),
            "failing": [k for k, status in statuses.items() if status != "checked" and k not in ALLOWED]}


def render(record: dict) -> str:
    sites = record["sites"]
    numbers = summary(record, [Site(key, e["path"], e["line"], e["line"], e["function"], e["exception"])
                               for key, e in sites.items()])
    run = record["run"]
    lines = [
        "# Raise sites and the tests that check their messages",
        "",
        "Rendered by `.venv/bin/python tests/raise_audit.py --run --write` from its record `docs/raise_audit.json`; "
        "`tests/test_raise_audit.py` fails when a `raise` in `src/superposition` is neither recorded here as "
        "checked nor allow-listed, and when this page is not the rendered record.",
        "",
        f"Run {run['date']}: `{run['command']}` under coverage, {run['tests']} tests collected, {run['failed']} "
        f"failed." + "".join(f" Merged {m['date']}: `{m['command']}`, {m['tests']} tests, {m['failed']} failed."
                             for m in run.get("merged", [])),
        "",
        f"- raise sites: **{numbers['total']}**",
        f"- reached by a test that checks the message: **{numbers['checked']}**",
        f"- allow-listed (reasons below): **{numbers['allowed']}**",
        f"- neither: **{len(numbers['failing'])}**",
        "",
        "A site is *checked* when a `with pytest.raises(...)` block caught an exception whose traceback ends on "
        "that `raise` and the test checked the message (`match=`, or `str(err.value)` in the test); the check of a "
        "Snakemake subprocess's output does not count. *executed*: coverage saw the line run, but no test caught "
        "its exception with a message check.",
        "",
        "## Allow-listed",
        "",
        "| site | status | reason |",
        "|---|---|---|",
    ]
    for key, reason in sorted(ALLOWED.items()):
        lines.append(f"| `{key}` | {sites.get(key, {}).get('status', 'not a site')} | {reason} |")
    lines += ["", "## Every site", "", "| file:line | function | exception | status | a test that checks it | check |",
              "|---|---|---|---|---|---|"]
    for key, e in sites.items():
        status = e["status"] + (" (allow-listed)" if key in ALLOWED and e["status"] != "checked" else "")
        test, check = "", ""
        if e.get("test"):
            more = f" (+{e['n_tests'] - 1} more)" if e["n_tests"] > 1 else ""
            test, check = f"`{e['test']}`{more}", "`" + e["check"].replace("|", "\\|") + "`"
        lines.append(f"| {e['path'].removeprefix('src/superposition/')}:{e['line']} | `{e['function']}` | "
                     f"`{e['exception']}` | {status} | {test} | {check} |")
    return "\n".join(lines) + "\n"


def run_suite(pytest_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hits_file, data_file = Path(tmp) / "hits.json", Path(tmp) / "coverage"
        # this file runs pytest with itself as a plugin (--inner): nothing is added to the environment the tests'
        # Snakemake subprocesses inherit but the name of the hits file
        env = {**os.environ, HITS_ENV: str(hits_file)}
        command = [sys.executable, "-m", "coverage", "run", f"--data-file={data_file}", f"--source={SRC}",
                   str(Path(__file__).resolve()), "--inner", *pytest_args]
        subprocess.run(command, cwd=ROOT, env=env, check=False)
        if not hits_file.exists():
            sys.exit("the test run wrote no hits file (did pytest start?)")
        run = json.loads(hits_file.read_text())
        import coverage

        data = coverage.CoverageData(basename=str(data_file))
        data.read()
        executed = {}
        for filename in data.measured_files():
            path = Path(filename).resolve()
            if path.is_relative_to(ROOT):
                executed[path.relative_to(ROOT).as_posix()] = set(data.lines(filename) or ())
    sites = [Site(**site) for site in run["sites"]]
    return {"run": {"date": datetime.date.today().isoformat(),
                    "command": " ".join(["pytest", *pytest_args]) if pytest_args else "pytest",
                    "tests": run["tests"], "failed": run["failed"], "exitstatus": run["exitstatus"]},
            "sites": classify(sites, run["hits"], executed)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inner"]:  # the suite itself, under coverage, with this module as its plugin
        import pytest

        # in this one process (-n 0): the plugin sees the exceptions of the tests it runs, not of xdist workers
        return pytest.main([*argv[1:], "-n", "0"], plugins=[sys.modules[__name__]])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the suite under coverage with the plugin first")
    parser.add_argument("--write", action="store_true", help="write docs/raise_audit.json and docs/raise_sites.md")
    parser.add_argument("--merge", action="store_true",
                        help="with --run on some tests: keep the record's checked sites this run does not check")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest with --run (default: the whole suite)")
    args = parser.parse_args(argv)
    if args.run:
        record = run_suite(args.pytest_args)
        if args.merge:
            old = json.loads(RECORD.read_text())
            for key, entry in record["sites"].items():
                if entry["status"] != "checked" and old["sites"].get(key, {}).get("status") == "checked":
                    record["sites"][key] = old["sites"][key]
            record["run"] = {**old["run"], "merged": [*old["run"].get("merged", []), record["run"]]}
    else:
        record = json.loads(RECORD.read_text())
    if args.write:
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        DOC.write_text(render(record))
    sites = raise_sites()
    result = summary(record, sites)
    for key in result["failing"]:
        entry = record["sites"].get(key, {})
        line = next(s.line for s in sites if s.key == key)
        print(f"{key.split('::')[0]}:{line}: {key} {entry.get('status', 'not in the record')}")
    print(f"raise sites: {result['total']}; checked by a test: {result['checked']}; allow-listed: "
          f"{result['allowed']}; neither: {len(result['failing'])}")
    return 1 if result["failing"] else 0


if __name__ == "__main__":
    sys.exit(main())
