"""Local training as composable loss terms (fedkd/loss_terms.py, fedkd/training.py)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from fedkd.distill import distillation_loss
from fedkd.loss_terms import LossTerm, Proximal, SoftTargets, Step, TeacherKD
from fedkd.training import LocalTraining, train_student

HP = LocalTraining(epochs=2, batch_size=8, lr=0.05, momentum=0.0, temperature=2.0, alpha=0.6)


def data(n=20, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(5, 3)


@dataclass(frozen=True)
class Recorder(LossTerm):
    """Adds nothing; records the rows it was given and whether it was inside `during`."""

    items: torch.Tensor
    rows: list[torch.Tensor] = field(default_factory=list)
    inside: list[bool] = field(default_factory=lambda: [False])

    @contextmanager
    def _around(self):
        self.inside[0] = True
        try:
            yield
        finally:
            self.inside[0] = False

    def during(self, model):
        return self._around()

    def fold(self, step: Step, loss):
        assert self.inside[0]
        if step.rows is not None:
            assert step.out.shape == (len(step.rows), 3)
            self.rows.append(step.rows)
        return loss


def test_a_term_with_items_sees_each_of_them_once_per_epoch_inside_its_context():
    x, y = data()
    term = Recorder(torch.randn(11, 5))
    train_student(model(), x, y, HP, torch.Generator().manual_seed(1), [term])
    seen = torch.cat(term.rows)
    assert sorted(seen.tolist()) == sorted(list(range(11)) * HP.epochs)
    assert not term.inside[0]  # left when training ended


def test_teacher_kd_is_alpha_ce_plus_the_rest_kd_on_its_own_items():
    x, y = data()
    items, probs = torch.randn(20, 5), torch.softmax(torch.randn(20, 3), -1)
    student = model()
    logits, out = student(x), student(items)
    term = TeacherKD(items, probs, alpha=0.6)
    idx, rows = torch.arange(20), torch.arange(20)
    step = Step(student, x, y, idx, logits, 2.0, rows=rows, out=out)
    ce = nn.functional.cross_entropy(logits, y)
    want = 0.6 * ce + 0.4 * distillation_loss(out, probs, 2.0)
    assert torch.equal(term.fold(step, ce), want)
    plain = Step(student, x, y, idx, logits, 2.0)  # no proxy rows this step
    assert torch.equal(term.fold(plain, ce), ce)


def test_terms_change_training_and_a_zero_weight_term_changes_nothing():
    x, y = data()
    probs = torch.softmax(torch.randn(20, 3), -1)

    def trained(terms):
        m = model()
        train_student(m, x, y, HP, torch.Generator().manual_seed(1), terms)
        return m.weight.detach().clone()

    plain = trained([])
    assert torch.equal(trained([SoftTargets(probs, 0.0)]), plain)
    assert not torch.equal(trained([SoftTargets(probs, 1.0)]), plain)


def test_the_proximal_term_keeps_the_model_nearer_its_start():
    x, y = data()
    start = model()
    w0 = start.weight.detach().clone()

    def drift(mu):
        m = model()
        terms = [Proximal.around(m, mu)] if mu else []
        train_student(m, x, y, HP, torch.Generator().manual_seed(1), terms)
        return float((m.weight.detach() - w0).norm())

    assert drift(10.0) < drift(0.0)


def test_a_term_that_fails_leaves_its_context():
    x, y = data()

    @dataclass(frozen=True)
    class Failing(Recorder):
        def fold(self, step, loss):
            raise RuntimeError("boom")

    term = Failing(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="boom"):
        train_student(model(), x, y, HP, torch.Generator().manual_seed(1), [term])
    assert not term.inside[0]
