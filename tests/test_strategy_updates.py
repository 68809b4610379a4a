"""Each strategy's aggregation and server update, pinned against a computation written
here from the papers' formulas (numpy for the aggregates, one hand-made SGD step for
the server models) on the tiny setting. One full-batch SGD step makes the update a
closed form: w - lr * grad(loss(w)).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.nn import functional as F

from fedkd.protocol import SOFT_LABELS, TEACHER
from fedkd.round_loop import conclude_round, prepare_round
from fedkd.seeding import numpy_rng
from tests.server_harness import (
    capture,
    logits_content,
    plans_of,
    rand_logits,
    reply,
    server_state,
    weights_content,
    weights_of,
)

LR, TAU = 0.5, 2.0
ONE_SGD_STEP = (  # one epoch, one batch over the 120 proxy items, plain SGD
    "distill.server_optimizer=sgd",
    f"distill.server_lr={LR}",
    "distill.server_epochs=1",
    "distill.server_batch_size=1000",
    f"distill.server_temperature={TAU}",
)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sgd_step(model, before, x, loss_of):
    """The weights after one plain SGD step from `before` on loss_of(model(x))."""
    m = copy.deepcopy(model)
    m.load_state_dict(before)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(loss_of(m(x)), list(params.values()))
    after = {k: v.clone() for k, v in before.items()}
    for (name, p), g in zip(params.items(), grads, strict=True):
        after[name] = p.detach() - LR * g
    return after


def kd_loss(target: np.ndarray, tau: float):
    """tau^2 * KL(target || softmax(z / tau)), batch mean (up to a constant in z)."""
    t = torch.tensor(target, dtype=torch.float32)
    return lambda z: -(tau**2) * (t * F.log_softmax(z / tau, dim=1)).sum(1).mean()


def assert_same_weights(actual: dict, expected: dict) -> None:
    for k, v in expected.items():
        assert torch.allclose(actual[k], v, atol=1e-5), k


def soft_label_round(plain_cfg, *overrides):
    """Round 1 of a soft-label strategy with three clients' random logits: the
    strategy, the logits, the proxy inputs, the teacher before and the target."""
    state = server_state(plain_cfg, *overrides, *ONE_SGD_STEP)
    r, downloads = prepare_round(state, 1)
    logits = np.stack([rand_logits(r, i) for i in range(3)]).astype(np.float32)
    before = weights_of(state.strategy.teacher)
    captured = capture(state)
    replies = [
        reply(pid, logits_content(z.astype(np.float16)))
        for (pid, _), z in zip(downloads, logits, strict=True)
    ]
    conclude_round(state, r, replies)
    target = captured.target[SOFT_LABELS].numpy()
    return state, r, logits.astype(np.float16).astype(np.float32), before, target


def test_fedmd_consensus_and_teacher_update(plain_cfg):
    state, r, logits, before, target = soft_label_round(plain_cfg, "strategy=fedmd")
    tau = state.strategy.temperature  # FedMD's consensus: softmax(mean logits / tau)
    assert np.allclose(target, softmax(logits.mean(0) / tau), atol=1e-6)
    teacher = state.strategy.teacher
    expected = sgd_step(teacher, before, r.proxy_x, kd_loss(target, TAU))
    assert_same_weights(teacher.state_dict(), expected)


def test_dsfl_era_and_teacher_update(plain_cfg):
    state, r, logits, before, target = soft_label_round(plain_cfg, "strategy=dsfl")
    era = softmax(softmax(logits).mean(0) / 0.1)  # ERA: softmax(mean_k softmax(z_k) / T)
    assert np.allclose(target, era, atol=1e-6)
    teacher = state.strategy.teacher
    expected = sgd_step(teacher, before, r.proxy_x, kd_loss(era, TAU))
    assert_same_weights(teacher.state_dict(), expected)


def test_dsfl_paper_broadcasts_the_last_consensus_on_its_items(plain_cfg):
    state, r, _, _, target = soft_label_round(
        plain_cfg, "strategy=dsfl_paper", "proxy.subset_size=40"
    )
    r2, downloads = prepare_round(state, 2)
    plan = plans_of(downloads)[0]
    assert plan.teacher_proxy == tuple(r.segments) and r2.segments != r.segments
    sent = downloads[0][1].array_records[TEACHER][SOFT_LABELS].numpy().astype(np.float32)
    assert np.allclose(sent, target, atol=1e-3)  # float16 on the wire


def test_fedavg_weighted_average(plain_cfg):
    # the paper's formula: uncapped shares (the default caps 70% at 50%, test_takeover.py)
    state = server_state(plain_cfg, "strategy=fedavg", "strategy.max_weight_share=1")
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    gen = torch.Generator().manual_seed(0)
    clients = [
        {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(3)
    ]
    sizes = [10, 20, 70]
    replies = [
        reply(pid, weights_content(w, n))
        for (pid, _), w, n in zip(downloads, clients, sizes, strict=True)
    ]
    conclude_round(state, r, replies)
    for k, v in state.strategy.model.state_dict().items():
        if v.is_floating_point():
            expected = sum(n * w[k].numpy() for w, n in zip(clients, sizes, strict=True)) / sum(
                sizes
            )
            assert np.allclose(v.numpy(), expected, atol=1e-6), k


def test_feddf_distills_the_average_toward_the_mean_client_logits(plain_cfg):
    overrides = ("strategy=feddf", "strategy.distill_epochs=1", "strategy.patience=1")
    state = server_state(plain_cfg, *overrides, *ONE_SGD_STEP)
    s = state.strategy
    r, downloads = prepare_round(state, 1)
    base = weights_of(s.model)
    gen = torch.Generator().manual_seed(1)
    clients = [
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(3)
    ]
    replies = [
        reply(pid, weights_content(w, 10)) for (pid, _), w in zip(downloads, clients, strict=True)
    ]
    metrics = conclude_round(state, r, replies)
    x = r.proxy_x
    average = {
        k: sum(w[k] for w in clients) / 3 if v.is_floating_point() else v for k, v in base.items()
    }
    scratch = copy.deepcopy(s.model).eval()
    outs = []
    for w in clients:
        scratch.load_state_dict(w)
        with torch.no_grad():
            outs.append(scratch(x).numpy())
    tau = s.temperature
    target = softmax(np.mean(outs, axis=0) / tau)  # the ensemble: mean logits, tempered
    order = numpy_rng(s.seed, 1, "feddf-holdout").permutation(len(x))
    fit = torch.from_numpy(order[max(1, int(len(x) * 0.2)) :])
    # FedDF tempers both sides with distill.temperature (targets are not pre-sharpened)
    expected = sgd_step(s.model, average, x[fit], kd_loss(target[fit.numpy()], tau))
    assert metrics["distill_val_loss"] < metrics["distill_val_loss_start"]  # the step was kept
    assert_same_weights(s.model.state_dict(), expected)


def test_central_takes_one_sgd_step_on_the_pooled_data(plain_cfg):
    overrides = ("strategy=central", "train.epochs=1", "train.batch_size=10000", "train.lr=0.5")
    state = server_state(plain_cfg, *overrides)
    s = state.strategy
    before = weights_of(s.model)
    r, _ = prepare_round(state, 1)
    conclude_round(state, r, [])
    x, y = s.data.pooled_data(0)
    expected = sgd_step(s.model, before, x, lambda z: F.cross_entropy(z, y))
    assert_same_weights(s.model.state_dict(), expected)


def test_server_temperature_is_the_distillation_temperature_unless_set(plain_cfg):
    fedmd = server_state(plain_cfg, "strategy=fedmd").strategy.cfg.distill
    assert fedmd.server_temperature is None and fedmd.server_tau == fedmd.temperature == 3.0
    set_apart = "distill.server_temperature=2"
    fedmd = server_state(plain_cfg, "strategy=fedmd", set_apart).strategy.cfg.distill
    assert fedmd.server_tau == 2.0 and fedmd.temperature == 3.0
    dsfl = server_state(plain_cfg, "strategy=dsfl").strategy.cfg.distill  # its config sets 1
    assert dsfl.server_temperature == 1.0 and dsfl.server_tau == 1.0
