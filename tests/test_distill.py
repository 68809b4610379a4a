import math

import pytest
import torch
from torch.nn import functional as F

from fedkd.distill import (
    distillation_loss,
    entropy,
    entropy_reduction_average,
    kd_loss,
    mean_logits,
    mean_probs,
    tempered_softmax,
)


def test_tempered_softmax_matches_definition():
    z = torch.tensor([[1.0, 2.0, 4.0]])
    tau = 2.0
    expected = torch.exp(z / tau) / torch.exp(z / tau).sum()
    assert torch.allclose(tempered_softmax(z, tau), expected)
    assert torch.allclose(tempered_softmax(z, 1.0), torch.softmax(z, -1))


def test_temperature_flattens_and_sharpens():
    z = torch.tensor([[0.0, 1.0, 3.0]])
    hot, cold = tempered_softmax(z, 10.0), tempered_softmax(z, 0.1)
    assert entropy(hot) > entropy(tempered_softmax(z, 1.0)) > entropy(cold)
    assert cold[0, 2] > 0.999


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_temperature_must_be_positive(tau):
    with pytest.raises(ValueError):
        tempered_softmax(torch.zeros(1, 3), tau)


def test_distillation_loss_is_tau_squared_kl():
    s = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 1.0]])
    pt = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    tau = 3.0
    ps = torch.softmax(s / tau, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert math.isclose(float(distillation_loss(s, pt, tau)), float(tau**2 * kl), rel_tol=1e-5)


def test_distillation_loss_zero_when_student_matches_teacher():
    s = torch.randn(4, 5)
    assert float(distillation_loss(s, tempered_softmax(s, 2.0), 2.0)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_kd_loss_interpolates_ce_and_kd():
    torch.manual_seed(0)
    s, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    pt = torch.softmax(torch.randn(6, 4), -1)
    ce = F.cross_entropy(s, y)
    kd = distillation_loss(s, pt, 2.0)
    assert torch.allclose(kd_loss(s, y, pt, alpha=1.0, temperature=2.0), ce)
    assert torch.allclose(kd_loss(s, y, pt, alpha=0.0, temperature=2.0), kd)
    assert torch.allclose(kd_loss(s, y, pt, alpha=0.3, temperature=2.0), 0.3 * ce + 0.7 * kd)
    assert torch.allclose(kd_loss(s, y, None, alpha=0.3, temperature=2.0), ce)


def test_kd_loss_uses_separate_proxy_logits():
    s, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    proxy = torch.randn(5, 4)
    pt = torch.softmax(torch.randn(5, 4), -1)
    got = kd_loss(s, y, pt, alpha=0.5, temperature=1.0, kd_logits=proxy)
    want = 0.5 * F.cross_entropy(s, y) + 0.5 * distillation_loss(proxy, pt, 1.0)
    assert torch.allclose(got, want)


def test_mean_logits_weighted_and_unweighted():
    a = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]])  # K=2, n=1, C=2
    assert torch.allclose(mean_logits(a), torch.tensor([[2.0, 1.0]]))
    w = torch.tensor([3.0, 1.0])
    assert torch.allclose(mean_logits(a, w), torch.tensor([[1.5, 0.5]]))
    with pytest.raises(ValueError):
        mean_logits(a, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        mean_logits(a, torch.tensor([1.0, 1.0, 1.0]))


def test_era_sharpens_the_average_and_stays_a_distribution():
    probs = torch.softmax(torch.randn(5, 20, 10) * 2, -1)
    avg = mean_probs(probs)
    era = entropy_reduction_average(probs, 0.1)
    assert torch.allclose(era.sum(-1), torch.ones(20))
    assert entropy(era) < entropy(avg)
    assert torch.equal(era.argmax(-1), avg.argmax(-1))  # sharpening keeps the decision
    assert torch.allclose(entropy_reduction_average(probs, 1.0), torch.softmax(avg, -1))


def test_unshuffled_distillation_takes_the_items_in_order():
    """shuffle=False (the reference DS-FL's loaders): every epoch walks the items in
    their own order, so it equals plain SGD over consecutive batches by hand, and
    the generator is left untouched."""
    from fedkd.training import distill_to_targets

    torch.manual_seed(0)
    x, q = torch.randn(10, 4), torch.softmax(torch.randn(10, 3), 1)
    model, by_hand = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    by_hand.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    distill_to_targets(
        model,
        x,
        q,
        temperature=1.0,
        epochs=2,
        lr=0.1,
        batch_size=4,
        generator=gen,
        optimizer=opt,
        shuffle=False,
    )
    assert torch.equal(gen.get_state(), state)
    opt = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    for _ in range(2):
        for s in range(0, 10, 4):
            loss = distillation_loss(by_hand(x[s : s + 4]), q[s : s + 4], 1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(model.parameters(), by_hand.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
