"""The declared config semantics (settings) and the code fingerprints (fingerprint), without Snakemake."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from superposition import fingerprint, settings

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"


def test_every_key_is_declared_with_a_kind_and_a_description():
    keys = settings.declared_keys()
    assert len(keys) > 50
    assert all(k.kind in settings.KINDS and k.description for k in keys)
    by_name = {k.name: k for k in keys}
    assert by_name["stats.checkpoint_every"].kind == "execution"
    assert by_name["facts.m"].kind == "result" and by_name["facts.m"].default == 128
    assert by_name["models.*.path"].per_model and by_name["corpus.n_shards"].kind == "structure"


def test_result_params_are_canonical_and_name_the_key():
    a = {"models": {"m": {"source": "local", "path": "/x"}}, "corpus": {"source": "wiki_offline"},
         "facts": {"context_templates": ["{}"], "m": 7}, "stats": {"device": "cpu"}}
    b = {"stats": {"device": "cuda"}, "facts": {"m": 7, "context_templates": ["{}"], "batch_size": 3},
         "corpus": {"source": "wiki_offline"}, "models": {"m": {"path": "/x", "source": "local"}}}
    for rule in ("keys", "known_facts", "corpus_shards", "activation_stats"):
        assert settings.result_params(a, rule) == settings.result_params(b, rule)
    params = settings.result_params(a, "known_facts")
    assert params["cfg__facts__m"] == "facts.m = 7"
    assert params["cfg__facts__pool_size"] == "facts.pool_size = 512"  # the schema's default
    assert "cfg__facts__batch_size" not in settings.result_params(a, "keys")  # an execution key
    # a key whose value is ignored in this setting is no param value
    assert settings.result_params(a, "corpus_shards")["cfg__corpus__dataset"] == "corpus.dataset: not used"
    hf = {**a, "corpus": {"source": "hf_datasets"}}
    assert settings.result_params(hf, "corpus_shards")["cfg__corpus__dataset"] == 'corpus.dataset = "wikimedia/wikipedia"'


def test_per_model_params_follow_the_wildcard():
    cfg = {"models": {"a": {"source": "local", "path": "/a"}, "b": {"source": "hub", "id": "gpt2"}}}
    params = settings.result_params(cfg, "model_snapshot")

    class Wildcards(dict):
        pass

    assert params["cfg__models__path"](Wildcards(model="a")) == 'models.a.path = "/a"'
    assert params["cfg__models__path"](Wildcards(model="b")) == "models.b.path: not used"
    sizes = settings.result_params(cfg, "figure_angles")["cfg__models__params_millions"](Wildcards())
    assert sizes == "models.a.params_millions = null; models.b.params_millions = null"


def test_rule_settings_fill_defaults_and_execution_is_recorded():
    cfg = {"stats": {"checkpoint_every": 3}, "models": {"m": {"source": "local", "path": "/x"}}}
    got = settings.rule_settings(cfg, "activation_stats")
    assert got["stats"]["checkpoint_every"] == 3 and got["stats"]["max_tokens_per_batch"] == 4096
    assert got["stats"]["model_dtype"] == "float32" and "ridge" not in str(got)
    record = settings.execution_record(cfg, "activation_stats")
    assert record["stats.checkpoint_every"] == 3 and "stats.model_dtype" not in record


def test_a_bad_declaration_is_refused(monkeypatch):
    bad = {"properties": {"x": {"type": "integer", "x-kind": "result", "description": "an x"}}}
    monkeypatch.setattr(settings, "schema", lambda: bad)
    settings.declared_keys.cache_clear()
    try:
        with pytest.raises(settings.SettingsError, match="x-rules is required"):
            settings.declared_keys()
    finally:
        settings.declared_keys.cache_clear()


def test_code_hash_ignores_comments_docstrings_and_layout(tmp_path):
    base = tmp_path / "m.py"
    base.write_text('"""Doc."""\n\ndef f(x):\n    """Doc of f."""\n    return x + 1\n')
    same = tmp_path / "same.py"
    same.write_text('"""Other doc."""\n# a comment\n\n\ndef f(x):  # why\n    """Another."""\n    return (x\n            + 1)\n')
    other = tmp_path / "other.py"
    other.write_text('"""Doc."""\n\ndef f(x):\n    return x + 2\n')
    assert fingerprint.code_hash(base) == fingerprint.code_hash(same) != fingerprint.code_hash(other)


def test_closures_hold_exactly_what_each_script_reaches():
    figures = fingerprint.closure(SCRIPTS / "figure_kde.py")
    assert "superposition.plots" in figures and "superposition.jobs.figures" in figures
    assert not {"superposition.stats", "superposition.keys", "superposition.corpus", "superposition.editing"} \
        & set(figures)
    stats = fingerprint.closure(SCRIPTS / "activation_stats.py")
    assert {"superposition", "superposition.jobs", "superposition.stats", "superposition.models",
            "superposition.corpus", "superposition.provenance", "superposition.settings"} <= set(stats)
    assert "superposition.plots" not in stats and "superposition.whitening" not in stats
    # presentation code is its own module: the matrices never rerun for it
    assert "superposition.jobs.top_pairs" not in fingerprint.closure(SCRIPTS / "matrices.py")


def test_relative_and_lazy_imports_are_followed(tmp_path):
    pkg = tmp_path / "superposition"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("X = 1\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a.X\n")
    (pkg / "sub" / "c.py").write_text("from ..b import f\n")
    (pkg / "unused.py").write_text("Y = 2\n")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        from superposition.sub import c
    """))
    assert fingerprint.closure(script, pkg) == ["superposition", "superposition.a", "superposition.b",
                                                "superposition.sub", "superposition.sub.c"]
    params = fingerprint.code_params(script, pkg)
    assert params["code__superposition__a"].startswith("superposition.a code ")
    assert params["code__script"].startswith("script.py code ")


def test_every_rule_has_a_script_and_every_script_a_rule():
    import re

    rules = {m for smk in (REPO / "rules").glob("*.smk") for m in re.findall(r"^rule (\w+):", smk.read_text(), re.M)}
    scripts = {p.stem for p in SCRIPTS.glob("*.py")}
    assert scripts == rules - {"rome_stats"}  # rome_stats only gathers the export's files


def test_the_order_of_models_means_nothing():
    a = {"models": {"x": {"source": "local", "path": "/x", "params_millions": 1},
                    "y": {"source": "local", "path": "/y", "params_millions": 2}}}
    b = {"models": dict(reversed(list(a["models"].items())))}
    pa = settings.result_params(a, "figure_angles")["cfg__models__params_millions"]
    pb = settings.result_params(b, "figure_angles")["cfg__models__params_millions"]
    assert pa({}) == pb({}) == "models.x.params_millions = 1; models.y.params_millions = 2"
    assert settings.rule_settings(a, "figure_angles") == settings.rule_settings(b, "figure_angles")


def test_a_key_that_matters_when_a_list_includes_a_value():
    """editing.memit_* matter (are params of lifelong_edit) only when editing.methods includes memit."""
    with_memit = settings.result_params({"editing": {"methods": ["closed_form", "memit"]}}, "lifelong_edit")
    without = settings.result_params({"editing": {"methods": ["closed_form", "control"]}}, "lifelong_edit")
    names = {"editing.memit_layers", "editing.memit_batch_size", "editing.memit_mom2_weight"}
    assert names <= {v.split(" = ")[0] for v in with_memit.values()}
    assert not names & {v.split(" = ")[0] for v in without.values()}
    assert "(only when methods includes memit)" in settings.rerun_table()


def test_imports_and_docstrings_are_found_in_every_kind_of_statement_body(tmp_path):
    """Branches, loops, handlers, finally, with, match cases, classes and nested functions hold imports too."""
    pkg = tmp_path / "superposition"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    names = ["if_", "else_", "for_", "while_", "try_", "handler", "try_else", "finally_", "with_", "case",
             "method", "nested"]
    for name in names:
        (pkg / f"{name}.py").write_text("X = 1\n")
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent('''
        import sys
        if sys:
            import superposition.if_
        else:
            import superposition.else_
        for _ in ():
            import superposition.for_
        while False:
            import superposition.while_
        try:
            import superposition.try_
        except ImportError:
            import superposition.handler
        else:
            import superposition.try_else
        finally:
            import superposition.finally_
        with open(__file__):
            from superposition import with_
        match sys.argv:
            case []:
                from superposition import case
        class A:
            def f(self):
                from superposition import method
                def g():
                    """Doc."""
                    from superposition import nested
        x = lambda: __import__("superposition.unused")  # an expression: never an import statement
    '''))
    assert fingerprint.closure(script, pkg) == ["superposition"] + sorted(f"superposition.{n}" for n in names)
    # a nested function's docstring does not count, its code does
    same = tmp_path / "same.py"
    same.write_text(script.read_text().replace('"""Doc."""', '"""Another doc."""'))
    other = tmp_path / "other.py"
    other.write_text(script.read_text().replace('"""Doc."""', '"""Doc."""\n            y = 1'))
    assert fingerprint.code_hash(script) == fingerprint.code_hash(same) != fingerprint.code_hash(other)


def test_a_schema_default_is_read_by_name_and_a_missing_one_is_named():
    schema = settings.schema()["properties"]["stats"]["properties"]
    assert settings.default("stats.max_tokens_per_batch") == schema["max_tokens_per_batch"]["default"]
    assert settings.default("stats.gram_tokens") is None  # a null default is a default
    with pytest.raises(settings.SettingsError, match=r"^schema key models\.\*\.id has no default$"):
        settings.default("models.*.id")
    with pytest.raises(settings.SettingsError, match=r"^no schema key stats\.no_such_key$"):
        settings.default("stats.no_such_key")
