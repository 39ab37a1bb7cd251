"""Facts in CounterFact's record shape, prompts with their subject span, and the known-fact selection.

A record: ``{"case_id": int, "requested_rewrite": {"prompt": "{} is a native speaker of", "relation_id": "P103",
"subject": "Vladimir Mayakovsky", "target_true": {"str": "Russian"}, "target_new": {"str": ...}}}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"


class FactError(ValueError):
    pass


@dataclass(frozen=True)
class Fact:
    case_id: int
    prompt: str
    subject: str
    target_true: str
    relation_id: str | None = None
    target_new: str | None = None

    @property
    def text(self) -> str:
        self.subject_span  # noqa: B018 - raises FactError when the prompt has no '{}'
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span of the subject in ``text``."""
        start = self.prompt.find("{}")
        if start < 0:
            raise FactError(f"case_id {self.case_id}: prompt {self.prompt!r} has no '{{}}', so the subject "
                            f"{self.subject!r} does not occur in it")
        return start, start + len(self.subject)


def parse_record(record: dict[str, Any], source: str) -> Fact:
    try:
        case_id = int(record["case_id"])
        rewrite = record["requested_rewrite"]
        prompt, subject = rewrite["prompt"], rewrite["subject"]
        target_true = rewrite["target_true"]["str"]
    except (KeyError, TypeError, ValueError) as err:
        where = record.get("case_id", "?") if isinstance(record, dict) else "?"
        raise FactError(f"{source}: record case_id={where} is not in CounterFact's shape (missing {err})") from err
    if prompt.count("{}") != 1:
        raise FactError(f"{source}: case_id {case_id}: prompt {prompt!r} must contain exactly one '{{}}' for the subject")
    if not subject or not subject.strip():
        raise FactError(f"{source}: case_id {case_id}: the subject is empty")
    if not target_true or not target_true.strip():
        raise FactError(f"{source}: case_id {case_id}: target_true is empty")
    new = rewrite.get("target_new")
    return Fact(case_id, prompt, subject, target_true.strip(), rewrite.get("relation_id"),
                new.get("str") if isinstance(new, dict) else None)


def probe_facts_path() -> Path:
    return Path(str(resources.files("superposition").joinpath("data/probe_facts.json")))


def load_facts(cfg: dict[str, Any]) -> tuple[list[Fact], str]:
    """Facts from the configured source, with an id naming that source.

    ``cfg``: ``source``, and as that source needs ``path``, ``case_ids`` and ``cache_dir`` (a CounterFact download).
    """
    source = cfg["source"]
    if source == "probe":
        path = probe_facts_path()
    elif source == "file":
        path = Path(cfg["path"])
    elif source == "counterfact":
        path = Path(cfg.get("path") or download_counterfact(cfg["cache_dir"]))
    else:
        raise FactError(f"facts.source {source!r} is not one of probe, file, counterfact")
    if not path.is_file():
        raise FactError(f"facts file {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FactError(f"facts file {path} is not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise FactError(f"facts file {path} must hold a JSON list of records")
    facts = [parse_record(r, str(path)) for r in records]
    seen: set[int] = set()
    for fact in facts:
        if fact.case_id in seen:
            raise FactError(f"facts file {path}: case_id {fact.case_id} occurs twice")
        seen.add(fact.case_id)
    case_ids = cfg.get("case_ids")
    if case_ids:
        by_id = {f.case_id: f for f in facts}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise FactError(f"facts.case_ids {missing[:10]} are not in {path}")
        facts = [by_id[c] for c in case_ids]
    return facts, f"{source}:{path.name}"


def download_counterfact(cache_dir: str | os.PathLike) -> Path:
    """CounterFact from the ROME data URL, cached (for users with internet)."""
    import urllib.request

    target = Path(cache_dir) / "counterfact.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(COUNTERFACT_URL, tmp)
        os.replace(tmp, target)
    return target


def select_known(case_ids: Sequence[int], known_by_model: dict[str, dict[int, bool]], m: int) -> tuple[list[int], dict[str, int]]:
    """Facts known by every model, in file order; returns (pool of all such case_ids, counts per model).

    Raises when fewer than ``m`` facts are known by all models, listing how many each model knows.
    """
    counts = {model: sum(bool(v) for v in known.values()) for model, known in known_by_model.items()}
    pool = [c for c in case_ids if all(known.get(c, False) for known in known_by_model.values())]
    if len(pool) < m:
        per_model = ", ".join(f"{model} knows {n}" for model, n in counts.items())
        raise FactError(
            f"only {len(pool)} facts are known by all models ({per_model}) but facts.m is {m}; "
            f"lower facts.m or add facts"
        )
    return pool, counts
