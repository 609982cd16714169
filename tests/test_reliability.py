"""Gold, agreement and annotator reliability: estimated, used in training, exported, acted on."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from conftest import annotation_event, captured_body

from ml_backend.metrics import Metrics
from rlhf_core.acquisition import layer_norm
from rlhf_core.config import BackendConfig
from rlhf_core.registry import REWARD_MODEL, Registry
from rlhf_core.reliability import CARELESS, SWAPPED, Judgement, estimate, needs_another_look
from rlhf_core.reward_model import EnsembleHeads, RewardModel, RewardModelConfig
from rlhf_core.store import Store
from rlhf_core.summary import annotator_kappa, gold_accuracy, project_agreement
from rlhf_core.tiny import build_tiny_encoder
from trainer.reward_training import (
    Pair,
    RewardTrainingConfig,
    pair_weights,
    preference_probabilities,
    train_heads,
)
from trainer.simulate import PoolItem, simulate

WORDS = ("alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta", "lambda", "zeta")
CROWD = {"c1": 0.92, "c2": 0.92, "c3": 0.92, "clicker": 0.5, "swapper": 0.08}


def planted_crowd(n: int, dim: int = 8, seed: int = 0, gold_every: int = 0):
    """Pairs with a linear truth, each labelled once by one of CROWD (accuracy as given);
    returns the judgements and their features, oriented as each label says."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=dim)
    labels, features = [], []
    for i in range(n):
        x = rng.normal(size=dim)
        first_wins = bool(x @ hidden > 0)
        annotator = list(CROWD)[i % len(CROWD)]
        says_first = first_wins if rng.random() < CROWD[annotator] else not first_wins
        labels.append(Judgement(annotator, f"pair{i}", says_first))
        features.append(x if says_first else -x)
        if gold_every and i % gold_every == 0:
            labels.append(Judgement("lead", f"pair{i}", first_wins, gold=True))
            features.append(x if first_wins else -x)
    return labels, np.array(features)


def test_the_estimator_finds_a_planted_random_clicker_and_swapper_without_gold_or_overlaps():
    labels, features = planted_crowd(600)
    found = estimate(labels, features, precision=1.0).annotators
    assert found["swapper"].flag == SWAPPED
    assert found["clicker"].flag == CARELESS
    assert all(found[c].flag == "" for c in ("c1", "c2", "c3"))
    careful = min(found[c].weight for c in ("c1", "c2", "c3"))
    assert careful > 0.6 and found["clicker"].weight < careful / 3  # not uniform weights
    assert (
        found["swapper"].reliability
        < 0.3
        < 0.8
        < min(found[c].reliability for c in ("c1", "c2", "c3"))
    )


def test_gold_answers_score_annotators_even_where_the_model_knows_nothing():
    labels, features = planted_crowd(300, gold_every=1)
    found = estimate(labels, np.zeros_like(features), precision=1.0).annotators  # no model
    assert found["swapper"].flag == SWAPPED and found["swapper"].gold_accuracy < 0.2
    assert found["c1"].flag == "" and found["c1"].gold_accuracy > 0.8
    assert found["c1"].gold_n == 60
    assert "lead" not in found or found["lead"].labels == 0  # gold is the answer, not a label


def test_overlaps_alone_find_the_annotator_who_disagrees_with_everyone():
    rng = np.random.default_rng(1)
    labels = []
    for i in range(80):
        truth = bool(rng.random() < 0.5)
        for annotator, accuracy in (("a", 0.9), ("b", 0.9), ("c", 0.9), ("inverted", 0.1)):
            says = truth if rng.random() < accuracy else not truth
            labels.append(Judgement(annotator, f"t{i}", says))
    found = estimate(labels, np.zeros((len(labels), 4)), precision=1.0).annotators
    assert found["inverted"].flag == SWAPPED
    assert all(found[a].flag == "" for a in "abc")


def test_nobody_holding_most_labels_is_turned_round():
    labels, features = planted_crowd(200)
    labels = [Judgement("everyone", j.item, not j.first) for j in labels]  # all swapped
    found = estimate(labels, -features, precision=1.0).annotators
    assert found["everyone"].flag != SWAPPED


def record(task, chosen, rejected, annotator, gold=False, tie=False):
    found = {"task": task, "chosen": chosen, "rejected": rejected, "annotator": annotator}
    found.update({"ground_truth": True} if gold else {}, tie=tie)
    return found


def test_gold_accuracy_agreement_and_alpha_on_a_hand_computed_example():
    records = [
        record(1, "a", "b", 1), record(1, "a", "b", 2), record(1, "a", "b", 9, gold=True),
        record(2, "d", "c", 1), record(2, "c", "d", 2), record(2, "c", "d", 9, gold=True),
        record(3, "e", "f", 1), record(3, "e", "f", 2, tie=True),
    ]  # fmt: skip
    # Gold: task 1 "first" (a), task 2 "first" (c). Annotator 1: a (right), d (wrong);
    # annotator 2: a, c (both right).
    assert gold_accuracy(records) == {"1": (0.5, 2), "2": (1.0, 2)}
    # Per comparison: t1 first×3; t2 second (1), first (2), first (9); t3 first (1), tie (2).
    # Pairs of verdicts (ordered): t1 6 agree of 6; t2 2 of 6; t3 0 of 2 -> 8/14.
    # Coincidences: (f,f) 3 + 1 = 4... nominal alpha by hand:
    # t1 (m=3): (f,f) 6 x 1/2 = 3.  t2 (m=3): (f,f) 2 x 1/2 = 1, (f,s)+(s,f) 4 x 1/2 = 2.
    # t3 (m=2): (f,t)+(t,f) = 2.  n_f = 3 + 1 + 1 + 1 = 6, n_s = 1, n_t = 1, n = 8.
    # observed disagreement 4; expected sum_{c!=k} n_c n_k = 2 (6 + 6 + 1) = 26.
    # alpha = 1 - (n - 1) * 4 / 26 = 1 - 28/26 = -0.0769.
    assert project_agreement(records) == {
        "items": 3,
        "labels": 8,
        "percent": round(8 / 14, 4),
        "alpha": round(1 - 28 / 26, 4),
    }
    # Annotator 1 against the others: (f,f) (f,f) | (s,f) (s,f) | (f,t): observed 2/5;
    # theirs f: 4, t: 1; mine f: 3, s: 2; chance = (3*4)/25 = 0.48; kappa = (0.4-0.48)/0.52.
    assert annotator_kappa(records)["1"] == round((0.4 - 0.48) / 0.52, 4)


def test_an_annotator_nobody_overlaps_has_no_kappa_rather_than_breaking_the_summary():
    """One annotator alone (the usual start of a project): κ is undefined, not a crash."""
    records = [
        {"task": 1, "prompt": "p", "chosen": "a", "rejected": "b", "annotator": 1},
        {"task": 2, "prompt": "q", "chosen": "c", "rejected": "d", "annotator": 1},
    ]
    assert annotator_kappa(records) == {"1": None}
    assert project_agreement(records)["items"] == 0


def test_ground_truth_travels_with_the_records_of_a_gold_annotation(client, client_store):
    gold = annotation_event(1, task_id=1, completed_by=9, selected="left")
    gold["annotation"]["ground_truth"] = True
    plain = annotation_event(2, task_id=1, completed_by=3, selected="right")
    for body in (gold, plain):
        assert client.post("/webhook", json=body).status_code == 200
    by_annotation = {r["annotation"]: r for r in client_store.records(1, "preference")}
    assert by_annotation[1]["ground_truth"] is True
    assert "ground_truth" not in by_annotation[2]
    summary = client.get("/api/projects/1/summary").get_json()
    rows = {row["annotator"]: row for row in summary["annotators"]}
    assert (rows[3]["gold_accuracy"], rows[3]["gold_n"]) == (0.0, 1)
    assert summary["agreement"]["percent"] == 0.0


def test_weights_change_what_the_heads_learn():
    torch.manual_seed(0)
    emb = torch.randn(200, 16)
    hidden = torch.randn(16)
    reward = torch.tensor(layer_norm(emb.numpy()), dtype=torch.float32) @ hidden
    a, b = torch.arange(0, 200, 2), torch.arange(1, 200, 2)
    chosen = torch.where(reward[a] > reward[b], a, b)
    rejected = torch.where(reward[a] > reward[b], b, a)
    # Every pair twice: once right (a careful annotator), once turned round (a swapper).
    both_c, both_r = torch.cat([chosen, rejected]), torch.cat([rejected, chosen])
    config = RewardTrainingConfig(epochs=60, bootstrap=False)

    def accuracy(weight):
        heads = EnsembleHeads(16, 2, 16, 0.0, seed=0)
        target = torch.ones(len(both_c))
        train_heads(heads, heads, emb, both_c, both_r, target, 2, config, pair_weight=weight)
        return (preference_probabilities(heads, emb, chosen, rejected).mean(axis=1) > 0.5).mean()

    pairs = [Pair("p", "c", "r")] * 100 + [Pair("p", "r", "c", weight=0.0)] * 100
    assert accuracy(pair_weights(pairs)) > 0.9
    assert accuracy(None) < 0.75  # the two halves cancel out


def test_a_low_agreement_task_gets_the_lowest_predict_score(client, client_store):
    setup = captured_body("01_setup")
    assert client.post("/setup", json=setup).status_code == 200
    body = captured_body("04_predict")
    first, second = body["tasks"][0], body["tasks"][1]
    for annotation_id, (annotator, side) in enumerate(((3, "left"), (4, "right")), 1):
        event = annotation_event(
            annotation_id,
            task_id=second["id"],
            task_data=second["data"],
            completed_by=annotator,
            selected=side,
        )
        assert client.post("/webhook", json=event).status_code == 200
    scores = {
        task["id"]: prediction[0]["score"]
        for task, prediction in zip(
            body["tasks"], client.post("/predict", json=body).get_json()["results"]
        )
    }
    assert scores[second["id"]] == 0.0 < scores[first["id"]]


def test_a_single_label_the_model_contradicts_gets_another_look_and_an_agreed_one_does_not():
    rewards = np.array([[3.0, 3.0], [0.0, 0.0]])  # response 0 far better (p = 0.95)
    assert needs_another_look([(1, 0, False)], rewards, contradiction=0.9)
    assert not needs_another_look([(1, 0, False)], rewards, contradiction=0.99)
    assert not needs_another_look([(0, 1, False), (0, 1, False)], rewards, 0.9)
    assert needs_another_look([(0, 1, False), (0, 1, True)], rewards, 0.9)


def test_metrics_export_reliability_with_a_bounded_number_of_annotators(tmp_path):
    config = BackendConfig(data_dir=tmp_path)
    store = Store(config.db_path).initialize()
    store.upsert_project(1, captured_body("01_setup")["schema"])
    registry = Registry(config.db_path, tmp_path / "models")
    annotators = {
        str(a): {"annotator": str(a), "labels": 100 + a, "reliability": 0.9, "flag": ""}
        for a in range(80)
    }
    annotators["7"].update(reliability=0.1, flag=SWAPPED)
    version, path = registry.new_version_dir(1, REWARD_MODEL)
    path.mkdir(parents=True)
    metrics = {"reliability": {"annotators": annotators, "agreement": {"alpha": 0.41}}}
    registry.record(1, REWARD_MODEL, version, path, {}, {}, metrics)
    registry.promote(1, {REWARD_MODEL: version})
    text = Metrics(store, registry, max_annotators=5).exposition().decode()
    series = re.findall(r'^rlhf_annotator_reliability\{annotator="(\d+)",project="1"\}', text, re.M)
    assert len(series) == 5
    assert "7" in series  # the flagged one is never cut
    assert set(series) - {"7"} == {"79", "78", "77", "76"}  # then those with most labels
    assert 'rlhf_annotator_flagged{annotator="7",flag="swapped",project="1"} 1.0' in text
    assert 'rlhf_annotator_agreement{measure="alpha",project="1"} 0.41' in text


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.set_num_threads(1)
    backbone = build_tiny_encoder(tmp_path_factory.mktemp("tiny") / "bert", seed=0)
    return RewardModel.create(RewardModelConfig(backbone=str(backbone), batch_size=64))


def test_simulate_with_annotator_ids_learns_past_a_planted_swapper_and_clicker(tiny_model):
    """The hard case: every pair labelled once, no gold, opaque ids."""
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=6)) for _ in range(700)]
    emb = layer_norm(tiny_model.embed(["q"] * len(texts), texts).numpy())
    utility = dict(zip(texts, emb @ np.random.default_rng(0).normal(size=emb.shape[1])))
    items = [PoolItem(f"i{k}", "q", (texts[2 * k], texts[2 * k + 1])) for k in range(350)]
    better = {i.id: int(utility[i.responses[1]] > utility[i.responses[0]]) for i in items}
    pool, evaluation = items[:300], [(i, better[i.id]) for i in items[300:]]
    ids = {"c1": "7f3a", "c2": "91bd", "c3": "0c44", "clicker": "e5e1", "swapper": "b2c8"}
    roles = {item.id: list(CROWD)[rng.randrange(5)] for item in pool}
    labels = {}
    for item in pool:
        right = rng.random() < 0.95
        labels[item.id] = {
            "clicker": rng.randint(0, 1),
            "swapper": 1 - better[item.id],
        }.get(roles[item.id], better[item.id] if right else 1 - better[item.id])
    who = {item_id: ids[role] for item_id, role in roles.items()}

    def run(annotators):
        result = simulate(
            tiny_model, pool, labels, evaluation, "random", 300, 100, 0, annotators=annotators
        )
        return result["curve"][-1]

    with_ids, without = run(who), run(None)
    assert with_ids["reliability"][ids["swapper"]]["flag"] == SWAPPED
    assert "reliability" not in without
    assert with_ids["eval_accuracy"] >= without["eval_accuracy"] + 0.05


def test_a_training_job_records_and_exports_the_reliability_it_trained_with(tmp_path, tiny_model):
    from rlhf_core.conversion import Provenance, convert
    from rlhf_core.label_schema import parse_label_config
    from rlhf_core.store import IncomingAnnotation
    from trainer.jobs import registry_for, train_job

    xml = captured_body("01_setup")["schema"]
    config = BackendConfig(
        data_dir=tmp_path, reward_backbone=tiny_model.config.backbone, policy_training="off"
    )
    store = Store(config.db_path).initialize()
    store.upsert_project(1, xml)
    schema, rng = parse_label_config(xml), random.Random(0)
    for i in range(90):
        polite, rude = f"thank you, here is step {i}", f"go away {i}, no"
        left = rng.random() < 0.5
        data = {"prompt": f"question {i}", "answer1": polite if left else rude}
        data["answer2"] = rude if left else polite
        annotator = 7 + i % 3  # 7 and 8 prefer the polite answer, 9 swaps the sides
        side = "left" if left == (annotator != 9) else "right"
        result = [{"from_name": "comparison", "to_name": "answer1", "type": "pairwise"}]
        result[0]["value"] = {"selected": side}
        incoming = IncomingAnnotation(i + 1, 1, i + 1, annotator, data, result, False, "t", xml)
        provenance = Provenance(1, i + 1, i + 1, annotator)
        store.upsert_annotation(incoming, convert(result, data, schema, provenance))
    store.enqueue_training(1, "test")
    assert train_job(config, store.claim_job("test"))["trained"]
    served = registry_for(config).versions(1, REWARD_MODEL)[-1]
    recorded = served.metrics["reliability"]
    assert recorded["flagged"] == {"9": SWAPPED}
    assert recorded["annotators"]["7"]["weight"] > 0.5
    metrics = Metrics(store, registry_for(config)).exposition().decode()
    assert 'rlhf_annotator_flagged{annotator="9",flag="swapped",project="1"} 1.0' in metrics


def test_the_pool_order_after_a_promotion_sends_disagreeing_and_contradicted_tasks_back():
    from test_preannotate import PAIRWISE, FakeLabelStudio, FakeModels

    from rlhf_core.label_schema import parse_label_config
    from rlhf_core.preannotate import preannotate_project

    unlabeled = [{"id": 1, "data": {"prompt": "q1", "answer1": "short", "answer2": "a longer"}}]
    ls = FakeLabelStudio(unlabeled)

    def labelled(task_id, left, right, *verdicts):
        task = {"id": task_id, "data": {"prompt": f"q{task_id}", "answer1": left, "answer2": right}}
        return task, [record(task_id, c, r, a) for a, (c, r) in enumerate(verdicts)]

    # FakeModels rewards length: "a much longer answer" beats "no" with p ~ 0.86.
    long, short = "a much longer answer", "no"
    tasks = [
        labelled(2, long, short, (long, short), (short, long)),  # two annotators disagree
        labelled(3, long, short, (short, long)),  # one label, against the model
        labelled(4, long, short, (long, short)),  # one label, with the model
        labelled(5, long, short, (long, short), (long, short)),  # two who agree
    ]
    report = preannotate_project(
        1, parse_label_config(PAIRWISE), FakeModels(), ls, 2, labelled=tasks, contradiction=0.8
    )
    assert report.another_look == 2
    assert {task: [p["score"] for p in found] for task, found in ls.predictions.items()} == {
        1: [ls.predictions[1][0]["score"]],
        2: [0.0],
        3: [0.0],
    }
    assert ls.predictions[1][0]["score"] > 0.0
