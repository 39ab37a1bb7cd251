import collections
import json

import pytest

from superposition import facts
from superposition.jobs import facts as facts_job
from superposition.settings import rule_settings


def test_probe_set_shape():
    probe, source = facts.load_facts({"source": "probe"})
    assert source == "probe:probe_facts.json"
    assert len(probe) >= 400
    relations = collections.Counter(f.relation_id for f in probe)
    assert len(relations) >= 10 and all(relations[r] >= 20 for r in list(relations)[:10])
    assert [f.case_id for f in probe] == list(range(len(probe)))
    assert len({(f.subject, f.relation_id) for f in probe}) == len(probe)


def test_probe_set_has_the_near_duplicates_the_case_study_needs():
    probe, _ = facts.load_facts({"source": "probe"})
    people = collections.defaultdict(set)
    for f in probe:
        words = f.subject.split()
        if len(words) == 2 and words[0][0].isupper():
            people[words[0]].add(f.subject)
    assert sum(len(s) >= 2 for s in people.values()) >= 6  # same first name, different surnames
    # a subject under two relations with two prompts that both begin with it (identical keys, p = 1)
    starts = collections.defaultdict(set)
    for f in probe:
        if f.prompt.startswith("{}"):
            starts[f.subject].add(f.relation_id)
    assert sum(len(r) >= 2 for r in starts.values()) >= 10
    # versions ending in the same number
    endings = collections.defaultdict(set)
    for f in probe:
        last = f.subject.split()[-1]
        if any(c.isdigit() for c in last):
            endings[last].add(f.subject)
    assert sum(len(s) >= 2 for s in endings.values()) >= 3


def test_bad_records_name_the_case_id(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([{"case_id": 7, "requested_rewrite": {"prompt": "no slot", "subject": "X",
                                                                      "target_true": {"str": "y"}}}]))
    with pytest.raises(facts.FactError, match="case_id 7: prompt 'no slot' must contain exactly one"):
        facts.load_facts({"source": "file", "path": str(path)})
    path.write_text(json.dumps([{"case_id": 3, "requested_rewrite": {"prompt": "{} is"}}]))
    with pytest.raises(facts.FactError, match="case_id=3 is not in CounterFact's shape"):
        facts.load_facts({"source": "file", "path": str(path)})
    with pytest.raises(facts.FactError, match=r"facts.case_ids \[99999\] are not in"):
        facts.load_facts({"source": "probe", "case_ids": [0, 99999]})


def test_fewer_known_facts_than_m_lists_each_model():
    known = {"a": {1: True, 2: True, 3: False}, "b": {1: True, 2: False, 3: True}}
    pool, counts = facts.select_known([1, 2, 3], known, 1)
    assert pool == [1] and counts == {"a": 2, "b": 2}
    with pytest.raises(facts.FactError, match=r"only 1 facts are known by all models \(a knows 2, b knows 2\) but facts.m is 2"):
        facts.select_known([1, 2, 3], known, 2)


def test_known_filter_keeps_predicted_and_drops_unpredicted(tmp_path, smollm2_snapshot):
    """A fact whose target the model predicts is kept; the same prompt with a wrong target is not."""
    records = [
        {"case_id": 10, "requested_rewrite": {"prompt": "The capital of {} is the city of", "subject": "France",
                                              "relation_id": "P36", "target_true": {"str": "Paris"}}},
        {"case_id": 11, "requested_rewrite": {"prompt": "The capital city of {} is", "subject": "France",
                                              "relation_id": "P36", "target_true": {"str": "Tokyo"}}},
    ]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    # the rules' settings, the schema's defaults filled in
    settings = rule_settings({"facts": {"source": "file", "path": str(path), "m": 1, "batch_size": 8},
                              "stats": {"device": "cpu"}}, "known_facts")
    cfg = {**settings["facts"], "batch_size": 8}
    stats_cfg = rule_settings({"stats": {"device": "cpu"}}, "fact_predictions")["stats"]
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(smollm2_snapshot))
    facts_job.fact_predictions(str(model_json), cfg, stats_cfg, str(tmp_path / "pred.tsv"))
    rows = facts_job.read_predictions(str(tmp_path / "pred.tsv"))
    assert [r["known"] for r in rows] == ["1", "0"]
    assert rows[0]["predicted_token"] == "ĠParis" and float(rows[0]["margin"]) > 0 > float(rows[1]["margin"])
    selection = facts_job.known_facts(["smollm2"], [str(tmp_path / "pred.tsv")], cfg, str(tmp_path / "known.tsv"),
                                     str(tmp_path / "sel.json"))
    assert selection["selected"] == [10] and selection["known_per_model"] == {"smollm2": 1}


def test_exclude_first_drops_facts_flagged_in_any_model(tmp_path):
    records = [{"case_id": c, "requested_rewrite": {"prompt": p, "subject": s, "relation_id": "P30",
                                                    "target_true": {"str": "Europe"}}}
               for c, p, s in [(1, "{} is located in the continent of", "Paris"),
                               (2, "The city of {} is located in the continent of", "Paris"),
                               (3, "{} is located in the continent of", "Tokyo"),
                               (4, "The country {} is located in the continent of", "France")]]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    columns = facts_job.PREDICTION_COLUMNS
    flags = {"a": {1: 1, 2: 0, 3: 0, 4: 0}, "b": {1: 1, 2: 0, 3: 1, 4: 0}}  # Tokyo is one token in b only
    tsvs = []
    for name, flag in flags.items():
        rows = ["\t".join(columns)] + ["\t".join(str(v) for v in [c, "P30", "s", "p", "Europe", "ĠEurope", "ĠEurope",
                                                                1, 1.0, 0.5, "Ġx", 0 if flag[c] else 3, flag[c]])
                                       for c in (1, 2, 3, 4)]
        tsvs.append(tmp_path / f"{name}.tsv")
        tsvs[-1].write_text("\n".join(rows) + "\n")
    cfg = rule_settings({"facts": {"source": "file", "path": str(path), "m": 2, "prompt_mode": "exclude_first"}},
                        "known_facts")["facts"]
    selection = facts_job.known_facts(list(flags), [str(p) for p in tsvs], cfg, str(tmp_path / "known.tsv"),
                                      str(tmp_path / "sel.json"))
    assert selection["pool"] == [2, 4] and "without the 2 facts whose subject is the prompt's first token" \
        in selection["mode"]
    cfg["prompt_mode"] = "as_is"
    selection = facts_job.known_facts(list(flags), [str(p) for p in tsvs], cfg, str(tmp_path / "known.tsv"),
                                      str(tmp_path / "sel.json"))
    assert selection["pool"] == [1, 2, 3, 4]
