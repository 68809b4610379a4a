"""Hostile clients (fedkd/hostile.py) against the server's boundary: every kind is
rejected, or, well-formed, bounded by robust aggregation; and a real seeded run with
3 hostile clients of 10 learns what the same run without them learns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedkd import hostile
from fedkd.comm.codecs import encode, recode
from fedkd.protocol import KNOWLEDGE, LOGITS, METRICS
from fedkd.results import read_metrics
from fedkd.round_loop import conclude_round, prepare_round
from fedkd.tally import Reply
from tests.server_harness import capture, rand_logits, reply, server_state

REJECTED = sorted(set(hostile.KINDS) - set(hostile.WELL_FORMED) - set(hostile.SILENT))


def honest(r, seed: int, rnd: int = 1) -> RecordDict:
    logits = torch.from_numpy(rand_logits(r, seed)).float()
    metrics = {"round": rnd, "num-examples": 50, "train-loss": 0.7, "test-accuracy": 0.5}
    return RecordDict({METRICS: MetricRecord(metrics), KNOWLEDGE: encode(logits, "int8", LOGITS)})


def hostile_round(plain_cfg, kind: str, caplog=None):
    state = server_state(plain_cfg, "strategy.codec=int8", "strategy.aggregator=median")
    state.declared_examples = {pid: 50 for pid in state.population}
    r, downloads = prepare_round(state, 1)
    (p0, _), (p1, _), (p2, _) = downloads
    bad = honest(r, 2)
    shape = r.knowledge_shape
    hostile.rewrite_reply(
        bad, KNOWLEDGE, kind, 0, 1, p2, lambda rec, fn: recode(rec, "int8", shape, fn)
    )
    captured = capture(state)
    stats = conclude_round(
        state, r, [reply(p0, honest(r, 0)), reply(p1, honest(r, 1)), reply(p2, bad)]
    )
    return state, stats, captured


@pytest.mark.parametrize("kind", REJECTED)
def test_every_malformed_kind_is_rejected_and_counted(plain_cfg, kind, caplog):
    state, stats, captured = hostile_round(plain_cfg, kind)
    assert stats["rejected"] == 1 and stats["replies"] == 2, kind
    assert "rejected reply from node 102" in caplog.text
    assert torch.isfinite(torch.from_numpy(captured.target["soft-labels"].numpy())).all()
    assert all(torch.isfinite(v).all() for v in state.strategy.teacher.state_dict().values())


@pytest.mark.parametrize("kind", hostile.WELL_FORMED)
def test_well_formed_hostile_logits_are_bounded_by_the_median(plain_cfg, kind):
    _, stats, captured = hostile_round(plain_cfg, kind)
    assert stats["rejected"] == 0 and stats["replies"] == 3
    target = torch.from_numpy(captured.target["soft-labels"].numpy())
    assert torch.isfinite(target).all() and torch.allclose(target.sum(1), torch.ones(len(target)))


def test_a_crashing_hostile_client_raises():
    content = RecordDict({METRICS: MetricRecord({"round": 1, "num-examples": 5})})
    with pytest.raises(hostile.HostileCrash):
        hostile.rewrite_reply(content, KNOWLEDGE, "crash", 0, 1, 0, None)


def test_an_int8_range_beyond_float16_decodes_to_no_inf_because_it_is_refused(plain_cfg):
    # the case found on the old main: range [-3e38, 3e38] passed and decoded to inf
    state = server_state(plain_cfg, "strategy.codec=int8")
    r, downloads = prepare_round(state, 1)
    record = encode(torch.zeros(r.knowledge_shape), "int8", LOGITS)
    record["logits-range"] = Array(np.array([-3e38, 3e38], np.float32))
    content = RecordDict(
        {METRICS: MetricRecord({"round": 1, "num-examples": 5}), KNOWLEDGE: record}
    )
    stats = conclude_round(state, r, [reply(downloads[0][0], content)])
    assert stats["rejected"] == 1 and stats["skipped"] == 1


@pytest.mark.parametrize("key", ["test-accuracy", "train-loss", "compute-seconds", "dp-epsilon"])
def test_a_list_where_a_number_belongs_is_rejected_not_fatal(plain_cfg, key):
    # on the old main a list here raised TypeError out of the reply loop
    state = server_state(plain_cfg)
    r, _ = prepare_round(state, 1)
    content = honest(r, 0)
    content.metric_records[METRICS][key] = [0.5]
    state2 = server_state(plain_cfg, "strategy.codec=int8")
    r2, downloads2 = prepare_round(state2, 1)
    stats = conclude_round(state2, r2, [reply(downloads2[0][0], content)])
    assert stats["rejected"] == 1


def test_num_examples_beyond_the_declared_shard_is_rejected(plain_cfg):
    # on the old main one client claiming 10^18 examples owned every weighted aggregate
    state = server_state(plain_cfg, "strategy.codec=int8", "strategy.weighted=true")
    state.declared_examples = {pid: 50 for pid in state.population}
    r, downloads = prepare_round(state, 1)
    greedy = honest(r, 0)
    greedy.metric_records[METRICS]["num-examples"] = 10**18
    stats = conclude_round(
        state, r, [reply(downloads[0][0], greedy), reply(downloads[1][0], honest(r, 1))]
    )
    assert stats["rejected"] == 1 and stats["replies"] == 1


def test_unexpected_records_are_rejected_and_not_counted_as_valid(plain_cfg):
    state = server_state(plain_cfg, "strategy.codec=int8")
    r, downloads = prepare_round(state, 1)
    content = honest(r, 0)
    content.array_records["weights"] = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    stats = conclude_round(state, r, [reply(downloads[0][0], content)])
    assert stats["rejected"] == 1


def test_a_reply_that_is_not_a_record_dict_is_rejected(plain_cfg):
    state = server_state(plain_cfg)
    r, downloads = prepare_round(state, 1)
    stats = conclude_round(state, r, [Reply(100, downloads[0][0], "not a RecordDict")])
    assert stats["rejected"] == 1


def test_weights_far_from_the_broadcast_model_are_rejected(plain_cfg):
    from tests.server_harness import weights_content, weights_of

    state = server_state(plain_cfg, "strategy=fedavg")
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    scaled = {k: v * 1e6 if v.is_floating_point() else v for k, v in base.items()}
    near = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    (p0, _), (p1, _), _ = downloads
    stats = conclude_round(
        state, r, [reply(p0, weights_content(scaled)), reply(p1, weights_content(near))]
    )
    assert stats["rejected"] == 1 and stats["replies"] == 1


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_weight_strategies_aggregate_robustly(plain_cfg, aggregator):
    from tests.server_harness import weights_content, weights_of

    state = server_state(
        plain_cfg,
        "strategy=fedavg",
        f"strategy.aggregator={aggregator}",
        "strategy.trim_fraction=0.34",
    )
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    shifts = (0.01, 0.02, 0.1)  # the third is an outlier within the norm bound
    replies = [
        reply(
            pid,
            weights_content({k: v + d if v.is_floating_point() else v for k, v in base.items()}),
        )
        for (pid, _), d in zip(downloads, shifts, strict=True)
    ]
    stats = conclude_round(state, r, replies)
    assert stats["replies"] == 3
    for k, v in state.strategy.model.state_dict().items():
        if v.is_floating_point():  # median of (+0.01, +0.02, +0.1) and the trimmed mean: +0.02
            assert torch.allclose(v, base[k] + 0.02, atol=1e-5), k


HARNESS = (
    "experiment=smoke",
    "num_clients=10",
    "clients_per_round=10",
    "partition=iid",
    "dataset.synthetic.test_size=1000",
    "eval.client_test_size=100",
    "strategy=fedmd",  # (DS-FL's teacher does not learn this tiny synthetic task)
    "strategy.codec=int8",
    "strategy.aggregator=median",
    "faults.hostile_fraction=0.3",
    "output.plots=false",
    "output.progress=false",
    "output.checkpoint=false",
)
ROUNDS = 334  # 3 hostile clients x 334 rounds: 1,002 hostile replies


@pytest.mark.slow
@pytest.mark.ray
def test_hostile_clients_cannot_crash_or_poison_a_real_run(tmp_path):
    from tests.test_simulation import fedkd_sim

    runs = {}
    for name, kinds in (("hostile", "[]"), ("without", "[crash]")):
        run = tmp_path / name
        fedkd_sim(
            *HARNESS,
            f"rounds={ROUNDS}",
            f"faults.hostile_kinds={kinds}",
            f"hydra.run.dir={run}",
            timeout=1800,
        )
        runs[name] = read_metrics(run)
    hostile_ids = hostile.hostile_partitions(0, 10, 0.3)
    draws = [
        hostile.round_kind(0, r, p, []) for r in range(1, ROUNDS + 1) for p in sorted(hostile_ids)
    ]
    expected_rejected = sum(k in REJECTED for k in draws)
    rows = runs["hostile"]
    assert len(rows) == ROUNDS and len(draws) >= 1000
    assert len(set(draws) & set(REJECTED)) >= 30
    assert sum(r["rejected"] for r in rows) == expected_rejected
    assert sum(r["failed"] for r in rows) == sum(k in hostile.SILENT for k in draws)
    assert all(r["replies"] >= 7 for r in rows)
    assert sum(r["failed"] for r in runs["without"]) == 3 * ROUNDS
    a, b = rows[-1]["teacher_accuracy"], runs["without"][-1]["teacher_accuracy"]
    assert math.isfinite(a) and abs(a - b) <= 0.01, (a, b)
    summary = {"hostile_replies": len(draws), "kinds": len(set(draws)), "teacher": a, "without": b}
    (tmp_path / "hostile-summary.json").write_text(json.dumps(summary))
    print(json.dumps(summary))
