"""The raise-site audit's record is complete and current: every ``raise`` in the library is checked by a test or
allow-listed with a reason (tests/raise_audit.py; the record comes from its full run, docs/raise_audit.json), and
the audit's own machinery attributes a caught exception to its site and sees how the test checked the message."""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest

import raise_audit as audit
from superposition import facts

RERUN = "rerun the audit: .venv/bin/python tests/raise_audit.py --run --write (the whole suite, under coverage)"


@pytest.fixture(scope="module")
def record():
    if os.environ.get(audit.HITS_ENV):
        pytest.skip("the audit's own run is rebuilding the record")
    return json.loads(audit.RECORD.read_text())


def test_every_raise_site_is_checked_by_a_test_or_allow_listed(record):
    sites = {site.key: site for site in audit.raise_sites()}
    failing = audit.summary(record, list(sites.values()))["failing"]
    assert not failing, "raise sites neither checked by a test nor allow-listed:\n" + "\n".join(
        f"  {sites[k].path}:{sites[k].line} {k}: {record['sites'].get(k, {}).get('status', 'not in the record')}"
        for k in failing) + f"\nadd a test that triggers each and checks its message, then {RERUN}"


def test_the_allow_list_names_real_sites_that_no_test_checks_each_with_its_reason(record):
    keys = {site.key for site in audit.raise_sites()}
    for key, reason in audit.ALLOWED.items():
        assert key in keys, f"ALLOWED names {key}, which is no raise site of the library (moved or removed?)"
        assert len(reason.split()) >= 8, f"ALLOWED[{key!r}] needs its reason"
        assert record["sites"][key]["status"] != "checked", f"{key} is checked by a test: drop it from ALLOWED"


def test_the_recorded_tests_exist(record):
    for key, entry in record["sites"].items():
        if entry["status"] != "checked":
            continue
        path, _, name = entry["test"].partition("::")
        function = re.sub(r"\[.*\]$", "", name).split("::")[-1]
        source = (audit.ROOT / path).read_text() if (audit.ROOT / path).is_file() else ""
        assert re.search(rf"^\s*def {re.escape(function)}\(", source, re.M), \
            f"{key}: its recorded test {entry['test']} is gone; {RERUN}"


def test_the_document_is_the_rendered_record(record):
    assert audit.DOC.read_text() == audit.render(record), f"docs/raise_sites.md is stale: {RERUN}"


def test_sites_are_listed_with_their_function_and_exception(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(textwrap.dedent('''\
        def f(x):
            if x:
                raise ValueError(f"x is {x}")
            raise ValueError("no x")

        class C:
            def g(self):
                def inner():
                    raise errors.Bad
                try:
                    inner()
                except KeyError:
                    raise
        '''))
    sites = audit.file_sites(module, "m.py")
    assert [(s.key, s.line) for s in sites] == [
        ("m.py::f::ValueError#1", 3), ("m.py::f::ValueError#2", 4), ("m.py::C.g.inner::errors.Bad#1", 9),
        ("m.py::C.g::(re-raise)#1", 13)]


def test_a_caught_raise_is_attributed_to_its_site_with_how_its_message_was_checked():
    raises = audit.wrap_raises(getattr(pytest.raises, "__wrapped__", pytest.raises))
    start = len(audit._hits)
    with raises(facts.FactError, match="is not one of probe"):
        facts.load_facts({"source": "wiki"})
    with raises(facts.FactError) as err:
        facts.load_facts({"source": "wiki"})
    assert "'wiki'" in str(err.value)
    with raises(facts.FactError):  # caught, message unchecked
        facts.load_facts({"source": "wiki"})
    with raises(KeyError):  # raised in the test itself: no library site
        raise KeyError("x")
    hits = audit._hits[start:]
    assert len(hits) == 3  # the test's own KeyError has no library origin
    assert [audit.message_check(hit) for hit in hits] == ["match='is not one of probe'", "str(err.value)", None]

    sites = audit.raise_sites()
    source = (audit.ROOT / "src/superposition/facts.py").read_text().splitlines()
    [site] = [s for s in sites if s.path == "src/superposition/facts.py"
              and "is not one of probe" in "\n".join(source[s.line - 1:s.end_line])]
    assert {(hit["path"], hit["line"]) for hit in hits} == {(site.path, site.line)}
    checked = audit.classify(sites, hits, executed=None)
    assert checked[site.key]["status"] == "checked" and checked[site.key]["n_tests"] == 2
    unchecked = audit.classify(sites, hits[2:], executed=None)
    assert unchecked[site.key]["status"] == "caught, message not checked"
    assert audit.classify(sites, [], executed={site.path: {site.line}})[site.key]["status"] == "executed"
    assert audit.classify(sites, [], executed={})[site.key]["status"] == "unreached"
