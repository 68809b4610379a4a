"""Server-side tests: feed the round loop (`conclude_round`) crafted replies, good and bad."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedkd.distill import entropy_reduction_average, mean_logits, tempered_softmax
from fedkd.protocol import KNOWLEDGE, LOGITS, METRICS, SOFT_LABELS, TEACHER, WEIGHTS
from fedkd.round_loop import begin_round, conclude_round, prepare_round
from fedkd.tally import Reply
from strategies import sample_partitions
from strategies.fedavg import average_weights
from tests.server_harness import (
    capture,
    logits_content,
    node_of,
    plans_of,
    rand_logits,
    reply,
    server_state,
    weights_content,
    weights_of,
)


def test_sampling_is_a_pure_sorted_function_of_seed_and_round():
    a = sample_partitions(0, 5, list(range(100)), 10)
    assert a == sample_partitions(0, 5, list(reversed(range(100))), 10)
    assert a == sorted(a) and len(set(a)) == 10
    assert a != sample_partitions(0, 6, list(range(100)), 10)
    assert sample_partitions(0, 1, [3, 1, 2], 5) == [1, 2, 3]


def test_fedmd_aggregates_mean_logits_and_trains_the_teacher(plain_cfg):
    state = server_state(plain_cfg, "strategy=fedmd")
    s = state.strategy
    r, downloads = prepare_round(state, 1)
    assert (
        len(downloads) == 3 and TEACHER not in downloads[0][1].array_records
    )  # round 1: no teacher yet
    logits = [rand_logits(r, i) for i in range(3)]
    before = weights_of(s.teacher)
    captured = capture(state)
    metrics = conclude_round(
        state,
        r,
        [reply(pid, logits_content(z)) for (pid, _), z in zip(downloads, logits, strict=True)],
    )
    target = captured.target
    expected = tempered_softmax(
        mean_logits(torch.tensor(np.stack(logits), dtype=torch.float32)), s.temperature
    )
    assert torch.allclose(torch.from_numpy(target[SOFT_LABELS].numpy()), expected, atol=1e-6)
    assert metrics["replies"] == 3 and metrics["rejected"] == 0 and metrics["failed"] == 0
    assert metrics["bytes_up"] == sum(ArrayRecord({LOGITS: Array(z)}).count_bytes() for z in logits)
    assert any(not torch.equal(before[k], v) for k, v in s.teacher.state_dict().items())
    # round 2 broadcasts the teacher's soft labels on the proxy subset, in float16
    r2, downloads2 = prepare_round(state, 2)
    soft = downloads2[0][1].array_records[TEACHER][SOFT_LABELS].numpy()
    assert soft.dtype == np.float16 and soft.shape == (len(r2.proxy_x), s.data.num_classes)
    assert np.allclose(soft.astype(np.float32).sum(1), 1, atol=1e-2)


def test_dsfl_uses_entropy_reduction_averaging(plain_cfg):
    state = server_state(plain_cfg, "strategy=dsfl")
    r, downloads = prepare_round(state, 1)
    logits = [rand_logits(r, i) for i in range(3)]
    captured = capture(state)
    conclude_round(
        state,
        r,
        [reply(pid, logits_content(z)) for (pid, _), z in zip(downloads, logits, strict=True)],
    )
    probs = torch.softmax(torch.tensor(np.stack(logits), dtype=torch.float32), -1)
    expected = entropy_reduction_average(probs, 0.1)
    assert torch.allclose(
        torch.from_numpy(captured.target[SOFT_LABELS].numpy()), expected, atol=1e-6
    )


def test_reply_order_does_not_change_the_aggregate(plain_cfg):
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        state = server_state(plain_cfg, "strategy=fedmd")
        r, downloads = prepare_round(state, 1)
        replies = [reply(downloads[i][0], logits_content(rand_logits(r, i))) for i in order]
        captured = capture(state)
        conclude_round(state, r, replies)
        results.append((captured.target[SOFT_LABELS].numpy(), weights_of(state.strategy.teacher)))
    assert np.array_equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


@pytest.mark.parametrize(
    "corrupt",
    [
        "nan",
        "inf",
        "shape",
        "dtype",
        "no_examples",
        "zero_examples",
        "no_knowledge",
        "bad_accuracy",
    ],
)
def test_bad_replies_are_rejected_and_counted(plain_cfg, corrupt, caplog):
    state = server_state(plain_cfg, "strategy=dsfl")
    r, downloads = prepare_round(state, 1)
    good = [
        reply(pid, logits_content(rand_logits(r, i))) for i, (pid, _) in enumerate(downloads[:2])
    ]
    bad_pid = downloads[2][0]
    z = rand_logits(r, 9)
    if corrupt == "nan":
        z[0, 0] = np.nan
        bad = logits_content(z)
    elif corrupt == "inf":
        z[3, 1] = np.inf
        bad = logits_content(z)
    elif corrupt == "shape":
        bad = logits_content(z[:-1])
    elif corrupt == "dtype":
        bad = logits_content(z, dtype=np.float32)
    elif corrupt == "no_examples":
        bad = logits_content(z, metrics={"round": 1, "test-accuracy": 0.5})
    elif corrupt == "zero_examples":
        bad = logits_content(z, metrics={"round": 1, "num-examples": 0})
    elif corrupt == "bad_accuracy":
        bad = logits_content(z, metrics={"round": 1, "num-examples": 5, "test-accuracy": 7.0})
    else:
        bad = RecordDict({METRICS: MetricRecord({"round": 1, "num-examples": 5})})
    captured = capture(state)
    metrics = conclude_round(state, r, [*good, reply(bad_pid, bad)])
    assert metrics["rejected"] == 1 and metrics["replies"] == 2
    assert "rejected reply" in caplog.text
    # the aggregate is exactly that of the two valid replies
    probs = torch.softmax(
        torch.stack(
            [
                torch.from_numpy(
                    g.content.array_records[KNOWLEDGE][LOGITS].numpy().astype(np.float32)
                )
                for g in good
            ]
        ),
        -1,
    )
    assert torch.allclose(
        torch.from_numpy(captured.target[SOFT_LABELS].numpy()),
        entropy_reduction_average(probs, 0.1),
        atol=1e-6,
    )


def test_client_errors_unknown_nodes_and_duplicates(plain_cfg):
    state = server_state(plain_cfg, "strategy=fedmd")
    r, downloads = prepare_round(state, 1)
    (p0, _), (p1, _), _ = downloads
    error = Reply(node_of(p0), p0, error="client crashed")
    dup = [
        reply(p1, logits_content(rand_logits(r, 1))),
        reply(p1, logits_content(rand_logits(r, 2))),
    ]
    stranger = Reply(999, None, logits_content(rand_logits(r, 3)))  # a node never admitted
    metrics = conclude_round(state, r, [error, *dup, stranger])
    assert metrics["failed"] == 1 and metrics["rejected"] == 2 and metrics["replies"] == 1


def test_round_without_valid_replies_keeps_the_teacher(plain_cfg, caplog):
    state = server_state(plain_cfg, "strategy=dsfl")
    r, downloads = prepare_round(state, 1)
    before = weights_of(state.strategy.teacher)
    z = rand_logits(r, 0)
    z[0, 0] = np.nan
    captured = capture(state)
    metrics = conclude_round(state, r, [reply(pid, logits_content(z)) for pid, _ in downloads])
    assert captured.target is None and metrics["rejected"] == 3 and metrics["skipped"] == 1
    assert captured.calls == []  # nothing was aggregated
    assert all(torch.equal(before[k], v) for k, v in state.strategy.teacher.state_dict().items())
    assert "0 valid replies, fewer than faults.min_replies=1; round skipped" in caplog.text


def test_round_with_too_few_valid_replies_is_skipped(plain_cfg, caplog):
    state = server_state(plain_cfg, "strategy=fedmd", "faults.min_replies=3")
    r, downloads = prepare_round(state, 1)
    before = weights_of(state.strategy.teacher)
    replies = [
        reply(pid, logits_content(rand_logits(r, i))) for i, (pid, _) in enumerate(downloads[:2])
    ]
    captured = capture(state)
    metrics = conclude_round(state, r, replies)
    assert captured.target is None and metrics["skipped"] == 1 and metrics["replies"] == 2
    assert captured.calls == []  # nothing was aggregated
    assert metrics["late"] == 1  # the third sampled client never answered
    assert all(torch.equal(before[k], v) for k, v in state.strategy.teacher.state_dict().items())
    assert "fewer than faults.min_replies=3" in caplog.text


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean"])
def test_robust_aggregators_limit_a_hostile_client(plain_cfg, aggregator):
    """With 3 clients, one sending extreme logits drags the mean, not the median."""
    from fedkd.faults import hostile_logits

    targets = {}
    for agg in ("mean", aggregator):
        state = server_state(
            plain_cfg, "strategy=fedmd", f"strategy.aggregator={agg}",
            "strategy.trim_fraction=0.34",
        )  # fmt: skip
        s = state.strategy
        r = begin_round(state, 1)  # round 1: the proxy subset exists
        honest = rand_logits(r, 0)
        z = [honest, honest + 0.01, hostile_logits(torch.tensor(honest), "extreme", 0).numpy()]
        logits = torch.tensor(np.stack(z), dtype=torch.float32)
        targets[agg] = s.aggregate_knowledge(logits, None)
        clean = s.aggregate_knowledge(logits[:2], None)
    assert (targets[aggregator] - clean).abs().max() < 0.05
    assert (targets["mean"] - clean).abs().max() > 0.5


def test_average_weights_is_weighted_and_keeps_int_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}
    avg = average_weights([a, b], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 7


def test_fedavg_averages_weights_and_rejects_mismatched_ones(plain_cfg):
    # a 75% share: the cap (strategy.max_weight_share, tests/test_takeover.py) lifted here
    state = server_state(plain_cfg, "strategy=fedavg", "strategy.max_weight_share=1")
    s = state.strategy
    r, downloads = prepare_round(state, 1)
    assert WEIGHTS in downloads[0][1].array_records
    base = weights_of(s.model)
    states = [{k: v + i / 100 for k, v in base.items()} for i in (1, 2)]
    wrong = {k: v for k, v in base.items()}
    first = next(iter(wrong))
    wrong[first] = torch.zeros(3)
    (p0, _), (p1, _), (p2, _) = downloads
    replies = [
        reply(p0, weights_content(states[0], 10)),
        reply(p1, weights_content(states[1], 30)),
        reply(p2, weights_content(wrong, 10)),
    ]
    metrics = conclude_round(state, r, replies)
    assert metrics["rejected"] == 1 and metrics["replies"] == 2
    for k, v in s.model.state_dict().items():
        if v.is_floating_point():  # (10 x 0.01 + 30 x 0.02) / 40
            assert torch.allclose(v, base[k] + 0.0175), k


def test_feddf_distills_the_average_toward_the_ensemble(plain_cfg):
    state = server_state(plain_cfg, "strategy=feddf")
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    states = [{k: v + 0.05 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    metrics = conclude_round(
        state,
        r,
        [reply(pid, weights_content(st)) for (pid, _), st in zip(downloads, states, strict=True)],
    )
    assert metrics["replies"] == 3
    assert metrics["distill_val_loss"] <= metrics["distill_val_loss_start"]


def test_label_memory_keeps_every_item_received_and_distills_on_all(plain_cfg):
    overrides = ("strategy=dsfl", "strategy.label_memory=true", "proxy.subset_size=40")
    state = server_state(plain_cfg, *overrides)
    s = state.strategy
    captured = capture(state)
    seen = set()
    for rnd in (1, 2):
        r, downloads = prepare_round(state, rnd)
        rows, _ = s.data.proxy_items(r.segments)
        seen |= set(rows.tolist())
        logits = [rand_logits(r, 10 * rnd + i) for i in range(3)]
        conclude_round(
            state,
            r,
            [
                reply(pid, logits_content(z, rnd=rnd))
                for (pid, _), z in zip(downloads, logits, strict=True)
            ],
        )
        known = ~s.memory[:, 0].isnan()
        assert set(torch.nonzero(known).squeeze(1).tolist()) == seen
        latest = torch.from_numpy(captured.target[SOFT_LABELS].numpy())
        assert torch.allclose(s.memory[torch.from_numpy(rows)], latest)  # the newest target
    assert 40 < len(seen) <= 80  # two random subsets of 40 out of 120
    restored = server_state(plain_cfg, *overrides).strategy
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.memory.nan_to_num(-1), s.memory.nan_to_num(-1))


@pytest.mark.parametrize("setting", ["strategy.label_memory=true", "strategy.download_size=10"])
def test_proxy_item_settings_are_refused_with_lifelong_streams(tiny_cfg, setting):
    from fedkd.compose import validate
    from fedkd.errors import ConfigError

    cfg = tiny_cfg("strategy=dsfl", setting, "lifelong=class_incremental", "rounds=20")
    with pytest.raises(ConfigError, match=r"strategy\.(label_memory|download_size)"):
        validate(cfg)


def test_download_codec_and_size_code_the_teachers_labels_apart(plain_cfg):
    from fedkd.comm.codecs import decode, encode
    from fedkd.training import soft_labels

    state = server_state(
        plain_cfg,
        "strategy=dsfl",
        "strategy.codec=onebit",
        "strategy.download_codec=int8",
        "strategy.download_size=20",
    )
    s = state.strategy
    r, downloads = prepare_round(state, 1)
    n, c = len(r.proxy_x), s.data.num_classes
    ups = [encode(torch.from_numpy(rand_logits(r, i)).float(), "onebit", LOGITS) for i in range(3)]
    replies = [
        reply(
            pid, RecordDict({METRICS: MetricRecord({"round": 1, "num-examples": 5}), KNOWLEDGE: u})
        )
        for (pid, _), u in zip(downloads, ups, strict=True)
    ]
    metrics = conclude_round(state, r, replies)
    assert metrics["replies"] == 3 and metrics["rejected"] == 0  # uploads in onebit
    picked = []
    for rnd in (2, 3):
        r, downloads = prepare_round(state, rnd)
        plans = set(plans_of(downloads))
        assert len(plans) == 1  # every client gets the same subset
        plan = plans.pop()
        assert (plan.codec, plan.teacher_codec, plan.teacher_count) == ("onebit", "int8", 20)
        rows = plan.teacher_rows(n)
        assert len(rows) == 20 and len(set(rows.tolist())) == 20
        sent = downloads[0][1].array_records[TEACHER]
        got = decode(sent, SOFT_LABELS, "int8", (20, c), kind="probs")
        x = r.proxy_x[torch.from_numpy(rows)]
        want = soft_labels(s.teacher, x, s.temperature, device="cpu")
        assert torch.allclose(got, want, atol=1 / 255)  # half an int8 step of [0, 1] or less
        picked.append(rows.tolist())
    assert picked[0] != picked[1]  # a new sample each round


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.download_codec=int4", r"strategy\.download_codec"),
        ("strategy.download_size=0", r"strategy\.download_size"),
        ("strategy.download_size=true", r"strategy\.download_size"),
        ("strategy.download_size=121", r"strategy\.download_size.*\(120\)"),
    ],
)
def test_bad_download_settings_are_refused(plain_cfg, override, message):
    from fedkd.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        server_state(plain_cfg, "strategy=dsfl", override)
