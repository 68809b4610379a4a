"""The federated glue of `fedkd-audit`: candidates, the server's view, shadows.

    candidates   m members drawn from the target client's shard, m non-members from
                 the test split with the same class counts (so the class mix, which
                 non-IID shards make obvious, tells the attacker nothing)
    server view  the target's last upload, rebuilt from its saved student exactly as
                 fedkd sent it: its weights, or its logits on the proxy set through
                 the run's codec; for logits, a surrogate student distilled from them
    shadows      K students trained like the target (the run's local recipe for
                 rounds x epochs, DP-SGD under privacy=sample) on the shard's other
                 examples plus a random half of the candidates, seen as the target is

The auditor is strong on purpose: it knows the target's non-candidate data and the
run's recipe, and only the membership of the candidates is secret. Shadows train on
the private data alone, without the teacher's soft labels the target also learned
from, so their score distributions are an approximation (documented in the README).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedkd.audit.attacks import lira_scores, logit_confidence
from fedkd.audit.metrics import attack_summary, one_run_epsilon, one_run_guesses
from fedkd.comm.codecs import decode, encode
from fedkd.config import FedKDConfig, typed
from fedkd.data.federated import FederatedData
from fedkd.distill import distillation_loss
from fedkd.errors import ConfigError
from fedkd.export import load_run, load_student
from fedkd.local_round import new_student
from fedkd.privacy import gaussian_epsilon
from fedkd.privacy.dpsgd import DPSGD, dp_steps_per_round, dp_train_student
from fedkd.privacy.noise import DPNoise
from fedkd.privacy.upload import private_rows
from fedkd.protocol import LOGITS, REPLY_LOGITS, REPLY_WEIGHTS
from fedkd.seeding import numpy_rng, torch_generator
from fedkd.training import LocalTraining, predict_logits, train_student


@dataclass(frozen=True)
class AuditSettings:
    client: int = 0  # the target partition
    candidates: int = 500  # members; as many non-members
    shadows: int = 4
    seed: int = 0
    shadow_epochs: int | None = None  # None: rounds x train.epochs, as the target trained
    surrogate_epochs: int = 10  # distilling a surrogate from a soft-label upload
    bootstrap: int = 200


def audit_run(run_dir: str | Path, settings: AuditSettings) -> dict[str, Any]:
    """Both attacks against one client of a finished run; a JSON-ready dict."""
    from strategies import STRATEGIES

    started = time.perf_counter()
    run_dir = Path(run_dir)
    plain, data = load_run(run_dir)
    cfg = typed(plain)
    strategy = STRATEGIES.get(cfg.strategy["name"])
    if not strategy.uses_clients or strategy.reply_kind not in (REPLY_LOGITS, REPLY_WEIGHTS):
        raise ConfigError("strategy", cfg.strategy["name"], "one whose clients upload something")
    if data.stream.lifelong:
        raise ConfigError("lifelong", cfg.lifelong.name, "none (audits cover static runs)")
    pid = settings.client
    if not 0 <= pid < cfg.num_clients:
        raise ConfigError("--client", pid, f"a partition from 0 to {cfg.num_clients - 1}")
    target = load_student(run_dir, plain, data, pid)
    kind = strategy.reply_kind

    cand = Candidates.draw(data, pid, settings.candidates, settings.seed)
    view = ServerView(cfg, data, pid, kind, settings)
    target_phi = view.scores(target, cand, tag="target")
    shadow_in = numpy_rng(settings.seed, "audit-shadow-in").random((settings.shadows, cand.m)) < 0.5
    shadow_phi = np.stack(
        [
            view.scores(view.train_shadow(cand, shadow_in[k], k), cand, tag=f"shadow-{k}")
            for k in range(settings.shadows)
        ]
    )
    bound = one_run_bound(view, cand, shadow_phi, shadow_in, cfg.privacy.delta)
    rng = numpy_rng(settings.seed, "audit-bootstrap")
    attacks = {
        "threshold": attack_summary(cand.member, target_phi, rng, settings.bootstrap),
        "lira": attack_summary(
            cand.member, lira_scores(target_phi, shadow_phi, shadow_in), rng, settings.bootstrap
        ),
    }
    return {
        "run": str(run_dir),
        "strategy": cfg.strategy["name"],
        "view": view.describe(),
        "privacy": cfg.privacy.mode,
        "epsilon": _run_epsilon(run_dir),
        "client": pid,
        "members": int(cand.member.sum()),
        "non_members": int((cand.member == 0).sum()),
        "settings": asdict(settings),
        "attacks": attacks,
        "epsilon_lower_bound": bound,
        "seconds": time.perf_counter() - started,
    }


@dataclass
class Candidates:
    x: torch.Tensor
    y: torch.Tensor
    member: np.ndarray  # 1: in the target's shard
    rest_x: torch.Tensor  # the target's shard without the member candidates
    rest_y: torch.Tensor

    @property
    def m(self) -> int:
        return len(self.y)

    @classmethod
    def draw(cls, data: FederatedData, pid: int, count: int, seed: int) -> Candidates:
        x, y = data.client_data(pid)
        rng = numpy_rng(seed, pid, "audit-candidates")
        count = min(count, len(y) // 2)  # keep half the shard for the shadows' base
        chosen = rng.choice(len(y), count, replace=False)
        test = data.splits.test
        labels = y.numpy()
        inside, outside = [], []
        for c in np.unique(labels[chosen]):  # as many non-members of each class as members
            mine = chosen[labels[chosen] == c]
            theirs = rng.permutation(np.flatnonzero(test.y == c))
            n = min(len(mine), len(theirs))
            inside.extend(mine[:n].tolist())
            outside.extend(theirs[:n].tolist())
        ins, outs = np.array(inside, dtype=np.int64), np.array(outside, dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(y)), ins)  # unused members stay in the shard
        member = np.concatenate([np.ones(len(ins), int), np.zeros(len(outs), int)])
        return cls(
            x=torch.cat([x[ins], data.normalize(test.x[outs])]),
            y=torch.cat([y[ins].long(), torch.from_numpy(test.y[outs]).long()]),
            member=member,
            rest_x=x[rest],
            rest_y=y[rest],
        )


class ServerView:
    """What the server sees of a student, and the scores it derives from that."""

    def __init__(
        self, cfg: FedKDConfig, data: FederatedData, pid: int, kind: str, settings: AuditSettings
    ) -> None:
        self.cfg, self.data, self.pid, self.kind, self.settings = cfg, data, pid, kind, settings
        self.codec = cfg.strategy.get("codec", "float16")

    def describe(self) -> str:
        if self.kind == REPLY_WEIGHTS:
            return "weights"
        if self.client_level:  # the server adds the noise, so it sees uploads without it
            return f"soft labels ({self.codec}), clipped, not noised"
        return f"soft labels ({self.codec})"

    @property
    def client_level(self) -> bool:
        return self.cfg.privacy.mode == "client"

    def scores(self, student: nn.Module, cand: Candidates, tag: str) -> np.ndarray:
        """phi of the server's model of `student` on every candidate."""
        model = student if self.kind == REPLY_WEIGHTS else self.surrogate(student, tag)
        return logit_confidence(predict_logits(model, cand.x), cand.y)

    def surrogate(self, student: nn.Module, tag: str) -> nn.Module:
        """A student distilled from the upload `student` makes: its logits on the whole
        proxy set, coded and decoded as the run's codec does."""
        proxy_x = self.data.proxy_x
        logits = predict_logits(student, proxy_x)
        if self.client_level:  # as the client's upload mod sends them
            logits = private_rows(logits, self.cfg.privacy.clip_norm)
        shape = (len(proxy_x), self.data.num_classes)
        probs = decode(encode(logits, self.codec, LOGITS), LOGITS, self.codec, shape, "probs")
        model = new_student(replace_seed(self.cfg, tag), self.data, self.pid)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch_generator(self.settings.seed, "audit-surrogate", tag)
        model.train()
        for _ in range(self.settings.surrogate_epochs):
            for idx in torch.randperm(len(proxy_x), generator=gen).split(128):
                opt.zero_grad(set_to_none=True)
                distillation_loss(model(proxy_x[idx]), probs[idx], 1.0).backward()
                opt.step()
        return model

    def _shadow_recipe(self) -> tuple[LocalTraining, DPSGD | None]:
        """The target's local training stretched over the run: rounds x epochs."""
        cfg, own = self.cfg, self.settings.shadow_epochs
        hp = LocalTraining.from_config(cfg.train, cfg.distill)
        hp = replace(hp, epochs=own or cfg.rounds * hp.epochs)
        if cfg.privacy.mode != "sample":
            return hp, None
        dp = DPSGD.from_config(cfg.privacy, LocalTraining.from_config(cfg.train, cfg.distill))
        return hp, replace(dp, epochs=own or cfg.rounds * dp.epochs)

    def shadow_epsilon(self, n: int) -> float | None:
        """The accountant's epsilon for a shadow's DP-SGD steps on n examples."""
        _, dp = self._shadow_recipe()
        if dp is None:
            return None
        q, steps = dp_steps_per_round(n, dp.batch_size, dp.epochs)
        pv = self.cfg.privacy
        return gaussian_epsilon(pv.noise_multiplier, [(q, steps)], pv.delta)

    def train_shadow(self, cand: Candidates, included: np.ndarray, k: int) -> nn.Module:
        """A student trained like the target on the shard's other examples plus the
        candidates `included` marks (members and non-members alike)."""
        keep = torch.from_numpy(included)
        x = torch.cat([cand.rest_x, cand.x[keep]])
        y = torch.cat([cand.rest_y.long(), cand.y[keep]])
        hp, dp = self._shadow_recipe()
        model = new_student(replace_seed(self.cfg, f"shadow-{k}"), self.data, self.pid)
        gen = torch_generator(self.settings.seed, "audit-shadow", k)
        if dp is not None:  # as the target trained: DP-SGD with its own settings
            dp_train_student(model, x, y, hp, dp, gen, noise=DPNoise())
        else:
            train_student(model, x, y, hp, gen)
        return model


def one_run_bound(
    view: ServerView,
    cand: Candidates,
    shadow_phi: np.ndarray,
    shadow_in: np.ndarray,
    delta: float,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """An empirical epsilon lower bound from each shadow (Steinke et al. 2023).

    Each shadow is one training run of the client's mechanism in which every
    candidate was included by a fair coin: the one-run audit's canaries. The server
    guesses "in" for the 10% highest-scoring candidates of its view and "out" for
    the 10% lowest. The test runs at 1 - confidence over K shadows (Bonferroni),
    and each shadow's bound sits beside the accountant's epsilon for the DP steps
    that shadow took (None without DP: nothing is promised)."""
    k, m = shadow_in.shape
    per_side = max(1, m // 10)
    p = (1 - confidence) / k
    shadows = []
    for i in range(k):
        r, v = one_run_guesses(shadow_in[i], shadow_phi[i], per_side)
        n = len(cand.rest_y) + int(shadow_in[i].sum())
        shadows.append(
            {
                "guesses": r,
                "correct": v,
                "epsilon_lower_bound": one_run_epsilon(m, r, v, delta, p),
                "accountant_epsilon": view.shadow_epsilon(n),
            }
        )
    return {
        "value": max(s["epsilon_lower_bound"] for s in shadows),
        "confidence": confidence,
        "canaries": m,
        "shadows": shadows,
    }


def replace_seed(cfg: FedKDConfig, tag: str) -> FedKDConfig:
    """The config with a seed of its own for `tag`: shadows and surrogates start from
    their own initialisation, not the target's."""
    from fedkd.seeding import derive_seed

    return replace(cfg, seed=derive_seed(cfg.seed, "audit", tag) % (2**31))


def _run_epsilon(run_dir: Path) -> float | None:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    value = json.loads(summary.read_text()).get("epsilon")
    return None if value is None or not math.isfinite(value) else float(value)
