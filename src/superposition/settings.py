"""What each rule's outputs depend on, derived from the one declared source: the config schema.

Every leaf key of ``data/config.schema.yaml`` declares its default, a description, its kind and the rules that read
it (see the schema's own description):

* ``result`` keys can change numbers: each becomes one param of exactly the rules that read it, rendered
  canonically as ``"facts.m = 128"`` (sorted JSON), so key order, comments, formatting and unrelated keys never
  rerun anything, and ``snakemake -n`` names the key that changed ("before: 'facts.m = 128' now: 'facts.m = 64'");
* ``execution`` keys (batching, checkpoints, device, caches) are never params: the jobs read them from the config
  through ``rule_settings`` and record them in their artifacts' provenance;
* ``structure`` keys decide which jobs and files exist (models, layers, shards, blocks).

Imported while Snakemake builds the DAG and by every job: cheap (yaml, json, fnmatch), no numpy or torch.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "config.schema.yaml"
KINDS = ("result", "execution", "structure")
_MISSING = object()


class SettingsError(ValueError):
    """The schema's declarations are inconsistent (a developer error, caught by the tests)."""


@dataclass(frozen=True)
class Key:
    """One declared config key. ``path`` has ``*`` for the model name in per-model keys: ("models", "*", "id")."""

    path: tuple[str, ...]
    kind: str
    rules: tuple[str, ...]
    default: Any
    description: str
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (sibling key, values) under which this key matters

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def per_model(self) -> bool:
        return self.path[:2] == ("models", "*")

    def read_by(self, rule: str) -> bool:
        return any(fnmatch.fnmatchcase(rule, pattern) for pattern in self.rules)


@functools.lru_cache(maxsize=None)
def schema() -> dict[str, Any]:
    return yaml.load(SCHEMA_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=None)
def declared_keys() -> tuple[Key, ...]:
    """Every leaf key of the schema, in schema order."""
    return tuple(_walk(schema(), ()))


def _walk(node: dict[str, Any], path: tuple[str, ...]) -> Iterator[Key]:
    if "x-kind" in node and path:
        kind = node["x-kind"]
        if kind not in KINDS:
            raise SettingsError(f"schema key {'.'.join(path)}: x-kind {kind!r} is not one of {KINDS}")
        if not node.get("description"):
            raise SettingsError(f"schema key {'.'.join(path)} has no description")
        rules = tuple(node.get("x-rules", ()))
        if (kind == "structure") == bool(rules):
            raise SettingsError(f"schema key {'.'.join(path)}: x-rules is required for result and execution keys "
                                f"and meaningless for structure keys")
        when = tuple((sibling, tuple(values)) for sibling, values in (node.get("x-when") or {}).items())
        yield Key(path, kind, rules, node.get("default", _MISSING), node["description"], when)
        if path == ("models",):
            yield from _walk(node["additionalProperties"], ("models", "*"))
        return
    properties = node.get("properties")
    if not properties:
        raise SettingsError(f"schema key {'.'.join(path) or '(top)'} declares neither x-kind nor properties")
    for name, child in properties.items():
        yield from _walk(child, path + (name,))


def default(name: str) -> Any:
    """The schema default of the key named ``name`` (e.g. "stats.max_tokens_per_batch")."""
    for key in declared_keys():
        if key.name == name:
            if key.default is _MISSING:
                raise SettingsError(f"schema key {name} has no default")
            return key.default
    raise SettingsError(f"no schema key {name}")


def has_default(key: Key) -> bool:
    return key.default is not _MISSING


def value_of(config: dict[str, Any], key: Key, model: str | None = None) -> Any:
    """The key's value in ``config`` (for per-model keys, of ``model``), else its schema default, else None."""
    node: Any = config
    for part in key.path:
        part = model if part == "*" else part
        if not isinstance(node, dict) or part not in node or node[part] is None and part != key.path[-1]:
            return None if key.default is _MISSING else key.default
        node = node[part]
    return node


def matters(config: dict[str, Any], key: Key, model: str | None = None) -> bool:
    """False where the key's x-when says its value is ignored (e.g. corpus.dataset unless corpus.source is
    hf_datasets): such a value is no param, so changing it reruns nothing."""
    by_path = {k.path: k for k in declared_keys()}
    for sibling, values in key.when:
        other = by_path.get(key.path[:-1] + (sibling,))
        if other is None:
            raise SettingsError(f"schema key {key.name}: x-when names {sibling!r}, which is not a sibling key")
        value = value_of(config, other, model)
        # a list-valued sibling (editing.methods) matters when it includes one of the values
        if not (any(v in values for v in value) if isinstance(value, list) else value in values):
            return False
    return True


def _models_of(config: dict[str, Any], model: str | None) -> list[str]:
    return [model] if model is not None else sorted(config.get("models") or {})


def rule_settings(config: dict[str, Any], rule: str, model: str | None = None) -> dict[str, Any]:
    """Every key ``rule`` reads (result and execution), nested as in the config, with the schema's defaults.

    Per-model keys come under ``models.{name}``: of ``model`` for a per-model job, of every model otherwise.
    """
    out: dict[str, Any] = {}
    for key in declared_keys():
        if key.kind == "structure" or not key.read_by(rule):
            continue
        if key.per_model:
            for name in _models_of(config, model):
                node = out.setdefault("models", {}).setdefault(name, {})
                for part in key.path[2:-1]:  # nested per-model keys (models.*.statistics.source)
                    node = node.setdefault(part, {})
                node[key.path[-1]] = value_of(config, key, name)
        else:
            node = out
            for part in key.path[:-1]:
                node = node.setdefault(part, {})
            node[key.path[-1]] = value_of(config, key)
    return out


def execution_record(config: dict[str, Any], rule: str, model: str | None = None) -> dict[str, Any]:
    """The execution keys ``rule`` reads, flat (``{"stats.checkpoint_every": 20}``): for artifacts' provenance."""
    out = {}
    for key in declared_keys():
        if key.kind == "execution" and key.read_by(rule):
            out[key.name] = value_of(config, key, model)
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def result_params(config: dict[str, Any], rule: str) -> dict[str, Callable[[Any], str] | str]:
    """The rule's params: one per result key it reads, as ``"facts.m = 128"``.

    Per-model keys are functions of the job's wildcards (that model, or every model for an across-model rule).
    Snakemake compares params by their text, so only a changed value of a key the rule reads reruns it.
    """
    params: dict[str, Callable[[Any], str] | str] = {}
    for key in declared_keys():
        if key.kind != "result" or not key.read_by(rule):
            continue
        param = "cfg__" + "__".join(p for p in key.path if p != "*")
        if key.per_model:
            params[param] = functools.partial(_per_model_param, config, key)
        else:
            params[param] = (f"{key.name} = {_canonical(value_of(config, key))}" if matters(config, key)
                             else f"{key.name}: not used")
    return params


def _per_model_param(config: dict[str, Any], key: Key, wildcards: Any) -> str:
    names = _models_of(config, wildcards.get("model"))
    sub = ".".join(key.path[2:])
    return "; ".join(f"models.{n}.{sub} = {_canonical(value_of(config, key, n))}" if matters(config, key, n)
                     else f"models.{n}.{sub}: not used" for n in names)


def job_settings(smk: Any) -> dict[str, Any]:
    """Inside a job's script: the settings of ``snakemake.rule`` for its model wildcard, from its config."""
    return rule_settings(smk.config, smk.rule, smk.wildcards.get("model"))


def check_rules(rules: Iterator[str] | list[str]) -> None:
    """Every x-rules entry must name (or match) a rule of the workflow: a typo would silently drop a dependency."""
    rules = list(rules)
    for key in declared_keys():
        for pattern in key.rules:
            if not fnmatch.filter(rules, pattern):
                raise SettingsError(f"schema key {key.name}: x-rules entry {pattern!r} matches no rule of the "
                                    f"workflow ({', '.join(sorted(rules))})")


def rerun_table() -> str:
    """The README's "what reruns when" table, generated from the declarations."""
    lines = ["| key | kind | a change reruns | default | meaning |", "|---|---|---|---|---|"]
    for key in declared_keys():
        if key.kind == "result":
            effect = ", ".join(f"`{r}`" for r in key.rules) + " and what reads their outputs"
        elif key.kind == "execution":
            effect = "nothing (recorded in provenance; read by " + ", ".join(f"`{r}`" for r in key.rules) + ")"
        else:
            effect = "the jobs whose files it adds or renames"
        if key.when:
            by_path = {k.path: k for k in declared_keys()}
            effect += " (only when " + " and ".join(
                f"{s} {'includes' if isinstance(by_path[key.path[:-1] + (s,)].default, list) else 'is'} "
                f"{' or '.join('null' if x is None else str(x) for x in v)}" for s, v in key.when) + ")"
        default = f"`{_canonical(key.default)}`" if has_default(key) else ""
        lines.append(f"| `{key.name}` | {key.kind} | {effect} | {default} | {key.description} |")
    return "\n".join(lines)
