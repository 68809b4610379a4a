"""Weights that cannot take over: a client's share of a weighted average is capped
(`strategy.max_weight_share`), FedAvg/FedDF updates are clipped to a norm bound
(`strategy.update_clip`), and BatchNorm statistics must mean something. On the old
main a node that declared 2**62 examples made the global model its own, and a
resnet8 reply with running_var=-1 turned the global model's outputs into NaN."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedkd.errors import ConfigError
from fedkd.round_loop import conclude_round, prepare_round
from strategies.base import capped_weights
from tests.server_harness import (
    capture,
    logits_content,
    rand_logits,
    reply,
    server_state,
    weights_content,
    weights_of,
)

HUGE = 2**62


def shifted(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict:
    """`base` plus a little seeded noise on its floating-point entries (an honest reply)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in base.items()
    }


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance over the floating-point entries."""
    return (
        sum(
            float(((a[k].double() - b[k].double()) ** 2).sum())
            for k in a
            if a[k].is_floating_point()
        )
        ** 0.5
    )


def norm(state: dict[str, torch.Tensor]) -> float:
    return (
        sum(float((v.double() ** 2).sum()) for v in state.values() if v.is_floating_point()) ** 0.5
    )


# ------------------------------------------------------------- the share cap


def test_capped_weights_water_fill_and_leave_honest_weights_alone():
    assert capped_weights([10, 20, 30], 0.5) == [10, 20, 30]  # the same numbers: no change
    assert capped_weights([HUGE, 50, 150], 0.5) == pytest.approx([0.5, 0.125, 0.375])
    # two giants capped; the excess goes to the others in proportion, then caps again
    shares = capped_weights([HUGE, HUGE, 1, 3], 0.3)
    assert shares == pytest.approx([0.3, 0.3, 0.1, 0.3]) and sum(shares) == pytest.approx(1)
    assert capped_weights([HUGE, 1, 1, 1], 0.2) == pytest.approx([0.25] * 4)  # infeasible cap
    assert capped_weights([10, 20, 70], 1.0) == [10, 20, 70]


def test_fedavg_caps_a_share_at_max_weight_share(plain_cfg):
    state = server_state(plain_cfg, "strategy=fedavg")
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    clients = [shifted(base, i) for i in range(3)]
    sizes = [10, 20, 70]  # 70% capped at 50%: shares 1/6, 1/3, 1/2
    replies = [
        reply(pid, weights_content(w, n))
        for (pid, _), w, n in zip(downloads, clients, sizes, strict=True)
    ]
    conclude_round(state, r, replies)
    for k, v in state.strategy.model.state_dict().items():
        if v.is_floating_point():
            expected = (clients[0][k] + 2 * clients[1][k] + 3 * clients[2][k]) / 6
            assert torch.allclose(v, expected, atol=1e-6), k


def test_a_declared_2_62_cannot_make_the_global_model_its_own(plain_cfg):
    # on the old main the average was the attacker's weights exactly
    state = server_state(plain_cfg, "strategy=fedavg")
    (p0, p1, p2) = state.population
    state.declared_examples = {p0: 50, p1: 50, p2: HUGE}  # a handshake that let it through
    r, _ = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    honest = [shifted(base, 0), shifted(base, 1)]
    attacker = {k: 8 * v if v.is_floating_point() else v for k, v in base.items()}
    stats = conclude_round(
        state,
        r,
        [
            reply(p0, weights_content(honest[0], 50)),
            reply(p1, weights_content(honest[1], 50)),
            reply(p2, weights_content(attacker, HUGE)),
        ],
    )
    now = state.strategy.model.state_dict()
    mean = {k: (honest[0][k] + honest[1][k]) / 2 for k in base}
    p = state.strategy.p
    # half the weight at most, its update at most update_clip x the broadcast's norm
    bound = p.max_weight_share * (p.update_clip * norm(base) + distance(mean, base))
    assert distance(now, mean) <= bound * 1.001
    assert distance(now, attacker) > 2 * norm(base)
    assert stats["replies"] == 3 and stats["clipped_updates"] == 1


def test_soft_label_weighted_average_caps_a_declared_2_62(plain_cfg):
    state = server_state(plain_cfg, "strategy=fedmd", "strategy.weighted=true")
    (p0, p1, p2) = state.population
    state.declared_examples = {p0: 50, p1: 50, p2: HUGE}
    r, _ = prepare_round(state, 1)
    captured = capture(state)
    z = [rand_logits(r, i).astype(np.float32) for i in range(3)]
    sizes = (50, 50, HUGE)
    conclude_round(
        state,
        r,
        [
            reply(pid, logits_content(zi, n))
            for pid, zi, n in zip((p0, p1, p2), z, sizes, strict=True)
        ],
    )
    target = torch.from_numpy(captured.target["soft-labels"].numpy())
    tau = state.strategy.temperature
    mean = torch.from_numpy(0.25 * z[0] + 0.25 * z[1] + 0.5 * z[2])  # capped at one half
    assert torch.allclose(target, torch.softmax(mean / tau, dim=1), atol=1e-3)


# ------------------------------------------------------------- update clipping


def test_an_update_beyond_update_clip_is_scaled_to_it(plain_cfg):
    state = server_state(plain_cfg, "strategy=fedavg")
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    far = {k: 6 * v if v.is_floating_point() else v for k, v in base.items()}  # 5x away
    honest = [shifted(base, 0), shifted(base, 1)]
    (p0, _), (p1, _), (p2, _) = downloads
    stats = conclude_round(
        state,
        r,
        [
            reply(p0, weights_content(honest[0])),
            reply(p1, weights_content(honest[1])),
            reply(p2, weights_content(far)),
        ],
    )
    clip = state.strategy.p.update_clip  # 5 x the norm scaled to update_clip x the norm
    clipped = {k: base[k] + (far[k] - base[k]) * clip / 5 for k in base}
    for k, v in state.strategy.model.state_dict().items():
        if v.is_floating_point():
            expected = (honest[0][k] + honest[1][k] + clipped[k]) / 3
            assert torch.allclose(v, expected, atol=1e-5), k
    assert stats["clipped_updates"] == 1 and stats["rejected"] == 0


def test_honest_updates_are_not_clipped(plain_cfg):
    state = server_state(plain_cfg, "strategy=feddf", "strategy.distill_epochs=1")
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    replies = [
        reply(pid, weights_content(shifted(base, i))) for i, (pid, _) in enumerate(downloads)
    ]
    assert conclude_round(state, r, replies)["clipped_updates"] == 0


def test_update_clip_and_max_weight_share_are_checked(tiny_cfg):
    from fedkd.compose import validate

    with pytest.raises(ConfigError, match=r"strategy\.update_clip"):
        validate(tiny_cfg("strategy=fedavg", "strategy.update_clip=20"))  # > max_update_ratio
    with pytest.raises(ConfigError, match=r"strategy\.max_weight_share"):
        validate(tiny_cfg("strategy=dsfl", "strategy.max_weight_share=0"))


# ------------------------------------------------------------- BatchNorm statistics


def batchnorm_round(plain_cfg, poison):
    """A resnet8 FedAvg round: two honest replies and one whose state `poison` edits."""
    state = server_state(plain_cfg, "strategy=fedavg", "model=resnet8")
    r, downloads = prepare_round(state, 1)
    base = weights_of(state.strategy.model)
    bad = shifted(base, 2)
    poison(bad)
    states = [shifted(base, 0), shifted(base, 1), bad]
    replies = [
        reply(pid, weights_content(w)) for (pid, _), w in zip(downloads, states, strict=True)
    ]
    return state, r, conclude_round(state, r, replies)


def _set(suffix: str, value: float) -> Callable[[dict], None]:
    def poison(state: dict[str, torch.Tensor]) -> None:
        key = next(k for k in state if k.endswith(suffix))
        state[key] = torch.full_like(state[key], value)

    return poison


@pytest.mark.parametrize(
    ("poison", "named"),
    [
        (_set("running_var", -1.0), "running_var"),
        (_set("num_batches_tracked", HUGE), "num_batches_tracked"),
        (_set("num_batches_tracked", -1), "num_batches_tracked"),
        (_set("running_mean", float("inf")), "running_mean"),
        (_set("running_var", float("nan")), "running_var"),
    ],
    ids=["negative-var", "huge-count", "count-below-broadcast", "inf-mean", "nan-var"],
)
def test_batchnorm_statistics_that_mean_nothing_are_refused(plain_cfg, caplog, poison, named):
    # on the old main running_var=-1 and num_batches_tracked=2**62 passed
    state, r, stats = batchnorm_round(plain_cfg, poison)
    assert stats["rejected"] == 1 and stats["replies"] == 2
    line = next(m for m in caplog.messages if "rejected reply" in m)
    assert named in line
    model = state.strategy.model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(r.proxy_x[:16])).all()
    tracked = [v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert all(0 <= int(v) <= 10**7 for v in tracked)
