"""Hostile clients (fedkd/hostile.py) against the server's boundary: every kind is
rejected, or, well-formed, bounded by robust aggregation (or, for a takeover from a
node that declared a huge shard, by the share cap and update clipping); and a real
seeded run with 3 hostile clients of 10 learns what the same run without them learns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd import hostile
from fedkd.comm.codecs import encode, recode
from fedkd.protocol import KNOWLEDGE, LOGITS, METRICS, WEIGHTS
from fedkd.reply_checks import MAX_EXTRA_METRICS
from fedkd.results import read_metrics
from fedkd.round_loop import conclude_round, prepare_round
from fedkd.server_state import build_server_state
from fedkd.tally import Reply
from tests.server_harness import (
    capture,
    logits_content,
    rand_logits,
    reply,
    server_state,
    weights_content,
    weights_of,
)

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
    state.participated = {p2}  # the hostile client replied validly before (HISTORY kinds)
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


# ------------------------------------------------------- weight replies (FedAvg)

WEIGHT_KINDS = (  # the kinds added for weights, and the new metric checks on weights
    "batchnorm-poison",
    "weight-takeover",
    "examples-oversized",
    "round-as-float",
    "metric-flood",
    "initial-accuracy-again",
)


def weights_round(plain_cfg, kind: str, declared: int = 50):
    """A resnet8 FedAvg round: two honest replies and one of `kind` from a node that
    declared `declared` examples (and replied validly before)."""
    state = server_state(plain_cfg, "strategy=fedavg", "model=resnet8")
    r, downloads = prepare_round(state, 1)
    (p0, _), (p1, _), (p2, _) = downloads
    state.declared_examples = {p0: 50, p1: 50, p2: declared}
    state.participated = {p2}
    base = weights_of(state.strategy.model)
    gen = torch.Generator().manual_seed(0)
    honest = [
        {
            k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    bad = weights_content(honest[2], 50)
    hostile.rewrite_reply(bad, WEIGHTS, kind, 0, 1, p2, None)
    sent = {k: torch.from_numpy(a.numpy().copy()) for k, a in bad[WEIGHTS].items()}
    replies = [
        reply(p0, weights_content(honest[0], 50)),
        reply(p1, weights_content(honest[1], 50)),
        reply(p2, bad),
    ]
    return state, r, base, [*honest[:2], sent], conclude_round(state, r, replies)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_new_kinds_are_rejected_from_weight_replies(plain_cfg, kind, caplog):
    state, r, *_, stats = weights_round(plain_cfg, kind)
    assert stats["rejected"] == 1 and stats["replies"] == 2, kind
    model = state.strategy.model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(r.proxy_x[:16])).all()


@pytest.mark.parametrize("kind", hostile.DECLARED_HUGE)
def test_a_declared_takeover_is_aggregated_but_bounded(plain_cfg, kind):
    # on the old main the global model became the attacker's own (8x the broadcast)
    state, _, base, (*honest, sent), stats = weights_round(
        plain_cfg, kind, declared=hostile.OVERSIZED
    )
    assert stats["rejected"] == 0 and stats["replies"] == 3
    p, now = state.strategy.p, state.strategy.model.state_dict()

    def dist(a, b):
        keys = [k for k in a if a[k].is_floating_point()]
        return sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys) ** 0.5

    mean = {k: (honest[0][k] + honest[1][k]) / 2 for k in base}
    scale = dist(base, {k: torch.zeros_like(v) for k, v in base.items()})
    bound = p.max_weight_share * (p.update_clip * scale + dist(mean, base))
    assert dist(now, mean) <= 1.001 * bound  # at most half the weight, a clipped update
    assert dist(now, sent) >= 0.49 * dist(mean, sent)  # not the hostile client's model
    assert stats["clipped_updates"] == (kind == "weight-takeover")


# ------------------------------------------------------- metrics and records


def test_a_round_echo_must_be_an_integer(plain_cfg, caplog):
    state = server_state(plain_cfg, "strategy=fedmd")
    r, downloads = prepare_round(state, 1)
    content = logits_content(rand_logits(r, 0), metrics={"round": 1.0, "num-examples": 5})
    assert conclude_round(state, r, [reply(downloads[0][0], content)])["rejected"] == 1
    assert "metric 'round' must be an integer, got 1.0" in caplog.text


def test_unknown_metrics_are_few_and_short(plain_cfg, caplog):
    state = server_state(plain_cfg, "strategy=fedmd")
    r, downloads = prepare_round(state, 1)
    z = rand_logits(r, 0)

    def metrics(**extra):
        return {"round": 1, "num-examples": 5, **extra}

    few = {f"m{i}": 1.0 for i in range(MAX_EXTRA_METRICS)}
    many = {f"m{i}": 1.0 for i in range(100)}  # on the old main: 100,000 passed
    long = {"m" * 65: 1.0}
    replies = [
        reply(pid, logits_content(z, metrics=metrics(**extra)))
        for (pid, _), extra in zip(downloads, (few, many, long), strict=True)
    ]
    stats = conclude_round(state, r, replies)
    assert stats["replies"] == 1 and stats["rejected"] == 2
    assert "100 unknown metrics, more than 16" in caplog.text
    assert "longer than 64" in caplog.text


def test_the_byte_cap_counts_metrics_and_info_too(plain_cfg, caplog):
    state = server_state(plain_cfg, "strategy=fedmd")
    r, downloads = prepare_round(state, 1)
    content = logits_content(rand_logits(r, 0))
    content.metric_records[METRICS]["k" * 100_000] = 1.0  # on the old main: accepted
    assert conclude_round(state, r, [reply(downloads[0][0], content)])["rejected"] == 1
    assert "bytes in the reply, more than this round allows" in caplog.text


def test_a_rejection_names_at_most_five_unexpected_records(plain_cfg, caplog):
    state = server_state(plain_cfg, "strategy=fedmd")
    r, downloads = prepare_round(state, 1)
    content = logits_content(rand_logits(r, 0))
    for i in range(300):
        content.config_records[f"{i:03d}" + "x" * 200] = ConfigRecord({"a": 1})
    assert conclude_round(state, r, [reply(downloads[0][0], content)])["rejected"] == 1
    line = next(m for m in caplog.messages if "rejected reply" in m)
    assert line.endswith("and 295 more") and len(line) < 400
    assert "'000" + "x" * 37 + "'" in line


def lifelong_reply(r, seed: int, initial: bool) -> RecordDict:
    metrics = {"round": r.number, "num-examples": 5, "task-accuracy": [0.5, 0.5]}
    if initial:
        metrics["initial-task-accuracy"] = [0.1, 0.1]
    return logits_content(rand_logits(r, seed), metrics=metrics)


def test_initial_task_accuracy_only_in_a_first_participation_even_after_resume(plain_cfg, caplog):
    # on the old main a client could send its baseline every round and skew forward transfer
    lifelong = ("lifelong=class_incremental", "lifelong.num_tasks=2", "lifelong.rounds_per_task=1")
    plain = plain_cfg("strategy=fedmd", *lifelong)
    state = build_server_state(plain, "cpu")
    state.population = list(range(plain["num_clients"]))
    r, downloads = prepare_round(state, 1)
    (p0, _), (p1, _), (p2, _) = downloads
    first = conclude_round(state, r, [reply(p0, lifelong_reply(r, 0, True))])
    assert first["rejected"] == 0 and state.participated == {p0}
    resumed = build_server_state(plain, "cpu")  # the set survives a checkpoint
    resumed.population = state.population
    resumed.load_state_dict(state.state_dict())
    r2, _ = prepare_round(resumed, 2)
    stats = conclude_round(
        resumed,
        r2,
        [
            reply(p0, lifelong_reply(r2, 0, True)),  # again: refused
            reply(p1, lifelong_reply(r2, 1, True)),  # its first: accepted
            reply(p2, lifelong_reply(r2, 2, False)),
        ],
    )
    assert stats["rejected"] == 1 and stats["replies"] == 2
    assert f"node {100 + p0}: initial-task-accuracy from a returning client" in caplog.text
    assert resumed.evaluation.student_baselines == [[0.1, 0.1], [0.1, 0.1]]


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


def expected_outcomes(history: dict[int, list[str]]) -> tuple[int, int]:
    """Rejected and failed replies of hostile partitions that reply every round, from
    their kinds in round order: a HISTORY kind is refused only once the partition has
    replied validly (well-formed, or a HISTORY kind while it had not)."""
    rejected = failed = 0
    for kinds in history.values():
        seen = False
        for kind in kinds:
            if kind in hostile.SILENT:
                failed += 1
            elif kind in hostile.HISTORY and not seen:
                seen = True
            elif kind in REJECTED:
                rejected += 1
            else:
                seen = True
    return rejected, failed


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
    history = {
        p: [hostile.round_kind(0, r, p, []) for r in range(1, ROUNDS + 1)] for p in hostile_ids
    }
    draws = [k for kinds in history.values() for k in kinds]
    expected_rejected, expected_failed = expected_outcomes(history)
    rows = runs["hostile"]
    assert len(rows) == ROUNDS and len(draws) >= 1000
    assert len(set(draws) & set(REJECTED)) >= 30
    assert sum(r["rejected"] for r in rows) == expected_rejected
    assert sum(r["failed"] for r in rows) == expected_failed
    assert all(r["replies"] >= 7 for r in rows)
    assert sum(r["failed"] for r in runs["without"]) == 3 * ROUNDS
    a, b = rows[-1]["teacher_accuracy"], runs["without"][-1]["teacher_accuracy"]
    assert math.isfinite(a) and abs(a - b) <= 0.01, (a, b)
    summary = {"hostile_replies": len(draws), "kinds": len(set(draws)), "teacher": a, "without": b}
    (tmp_path / "hostile-summary.json").write_text(json.dumps(summary))
    print(json.dumps(summary))
