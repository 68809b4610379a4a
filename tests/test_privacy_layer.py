"""The privacy layer the round loop calls (fedkd/privacy/ledger.py): client-level
noise no strategy can forget, a cohort nobody can predict from the seed, and
accounting that covers every client that trained. Each test fails on the main of
before the layer (fb2eed6..5c904e5), where SoftLabelStrategy added the noise itself,
the cohort was a function of (seed, round) and only valid replies were counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.privacy.accounting import gaussian_epsilon
from fedkd.privacy.dpsgd import dp_steps_per_round
from fedkd.privacy.ledger import AGGREGATE, POISSON_SECRET, POISSON_SEEDED
from fedkd.privacy.upload import private_rows
from fedkd.round_loop import conclude_round, prepare_round
from tests.server_harness import logits_content, logits_round, rand_logits, reply, server_state

PLAIN = ("plugins=[tests.plugin_plain_mean]", "~strategy", "+strategy.name=plain_mean")
CLIENT_DP = ("privacy=client", "privacy.clip_norm=1.0")


def test_a_strategy_that_ignores_privacy_still_gets_only_the_noised_mean(plain_cfg):
    state = server_state(plain_cfg, *PLAIN, *CLIENT_DP, "privacy.noise_multiplier=2.0")
    r, downloads = prepare_round(state, 1)
    uploads = [rand_logits(r, i) for i in range(len(downloads))]
    stats = conclude_round(
        state,
        r,
        [reply(pid, logits_content(u)) for (pid, _), u in zip(downloads, uploads, strict=True)],
    )
    ((partitions, got),) = state.strategy.seen
    assert partitions == [AGGREGATE]  # one reply: the federation's, no client's
    clipped = private_rows(torch.tensor(np.stack(uploads)).float(), 1.0).sum(0)
    expected = state.privacy.sample_rate * state.privacy.population
    noise = (got - clipped / expected) * expected  # float16 re-coding aside
    n = r.knowledge_shape[0]
    assert noise.std().item() == pytest.approx(2.0 * 1.0 * math.sqrt(n), rel=0.1)
    assert stats["epsilon"] > 0
    # without DP the same plugin sees every reply, as sent
    state = server_state(plain_cfg, *PLAIN)
    logits_round(state, 1)
    ((partitions, _),) = state.strategy.seen
    assert partitions == sorted(state.population)


def test_the_secret_cohort_is_poisson_and_differs_between_runs_with_one_seed(plain_cfg):
    overrides = (*CLIENT_DP, "partition=iid", "num_clients=40", "clients_per_round=10")
    a, b = (server_state(plain_cfg, *overrides) for _ in range(2))
    assert a.privacy.sampling == POISSON_SECRET
    cohorts_a = [prepare_round(a, rnd)[0].sampled for rnd in range(1, 6)]
    cohorts_b = [prepare_round(b, rnd)[0].sampled for rnd in range(1, 6)]
    assert cohorts_a != cohorts_b  # same seed: a 40-choose-~10 coincidence, five times
    sizes = {len(c) for c in cohorts_a + cohorts_b}
    assert len(sizes) > 1  # Poisson: each client by its own coin, not a fixed 10
    seeded = (*overrides, "privacy.secure_noise=false")
    c, d = (server_state(plain_cfg, *seeded) for _ in range(2))
    assert c.privacy.sampling == POISSON_SEEDED
    assert [prepare_round(c, 1)[0].sampled] == [prepare_round(d, 1)[0].sampled]


def test_every_sampled_client_is_counted_and_the_unamplified_epsilon_is_reported(plain_cfg):
    state = server_state(plain_cfg, *CLIENT_DP, "privacy.secure_noise=false")
    r, downloads = prepare_round(state, 1)
    # only the first client's reply arrives: the others trained all the same
    pid, _ = downloads[0]
    stats = conclude_round(state, r, [reply(pid, logits_content(rand_logits(r, 0)))])
    assert set(state.privacy.participations) == set(r.sampled)
    assert stats["max_participations"] == 1
    sigma = state.cfg.privacy.noise_multiplier
    assert stats["epsilon_unamplified"] == gaussian_epsilon(sigma, [(1.0, 1)], 1e-5)
    assert stats["epsilon_unamplified"] >= stats["epsilon"]


def test_sample_level_epsilon_covers_clients_whose_reply_never_came(plain_cfg):
    """Old main took the maximum over valid replies only: a client that trained and
    whose reply was lost or refused spent privacy the summary never showed."""
    state = server_state(plain_cfg, "privacy=sample", "privacy.batch_size=16")
    state.declared_examples = {pid: 40 + 20 * pid for pid in state.population}
    r, _ = prepare_round(state, 1)
    stats = conclude_round(state, r, [])  # every reply lost
    spent = []
    for pid in r.sampled:
        q, steps = dp_steps_per_round(state.declared_examples[pid], 16, state.cfg.train.epochs)
        spent.append(gaussian_epsilon(1.0, [(q, steps)], 1e-5))
    assert stats["epsilon"] == max(spent) > 0


def test_normalisation_comes_from_public_data_only(plain_cfg):
    """Old main took the channel statistics over the whole training split, private
    shards included: a release no accountant counted."""
    import copy
    from dataclasses import replace

    from fedkd.data.federated import federated_data

    data = federated_data(plain_cfg())

    def stats_with(rows: np.ndarray) -> list[np.ndarray]:
        splits = copy.deepcopy(data.splits)
        splits.train.x[rows] = 255 - splits.train.x[rows]  # other images there
        return list(replace(data, splits=splits, channel_stats=None).channel_stats)

    before = list(replace(data, channel_stats=None).channel_stats)
    private = stats_with(data.private_index)
    public = stats_with(data.proxy_index)
    assert all(np.array_equal(a, b) for a, b in zip(before, private, strict=True))
    assert not np.array_equal(before[0], public[0])
