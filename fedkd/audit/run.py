"""The federated glue of `fedkd-audit`: candidates, the server's view, the audits.

    candidates   m members drawn from the target client's shard, m non-members from
                 the test split with the same class counts (so the class mix, which
                 non-IID shards make obvious, tells the attacker nothing)
    server view  the target's last upload, rebuilt from its saved student exactly as
                 fedkd sent it: its weights, or its logits on the proxy set through
                 the run's codec; for logits, a surrogate student distilled from them
    shadows      students trained as the target trains (fedkd/audit/shadows.py),
                 seen as the target is: LiRA's references and the black-box bound
    white box    under privacy=sample, the client's DP-SGD replayed with Dirac
                 gradient canaries (fedkd/audit/canaries.py): the bound the
                 accountant's epsilon is checked against

The auditor is strong on purpose: it knows the target's non-candidate data and the
run's recipe, and only the membership of the candidates is secret.
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
from fedkd.audit.canaries import DiracSettings, dirac_audit
from fedkd.audit.client import ClientRecipe, client_recipe, trained_rounds
from fedkd.audit.metrics import attack_summary
from fedkd.audit.shadows import input_canaries, one_run_bound, train_shadows
from fedkd.comm.codecs import decode, encode
from fedkd.config import FedKDConfig, typed
from fedkd.data.federated import FederatedData
from fedkd.distill import distillation_loss
from fedkd.errors import ConfigError
from fedkd.export import load_run, load_student
from fedkd.local_round import new_student
from fedkd.privacy import gaussian_epsilon
from fedkd.privacy.dpsgd import dp_steps_per_round
from fedkd.privacy.upload import private_rows
from fedkd.protocol import LOGITS, REPLY_LOGITS, REPLY_WEIGHTS
from fedkd.seeding import numpy_rng, torch_generator
from fedkd.training import predict_logits


@dataclass(frozen=True)
class AuditSettings:
    client: int = 0  # the target partition
    candidates: int = 500  # members; as many non-members
    shadows: int | None = None  # None: 64 where a shadow is one round (FedAvg), else 8
    canaries: int = 500  # input canaries per shadow, for the black-box bound
    guesses: int = 25  # black-box: a side, per tested shadow
    dirac_canaries: int = 5000  # white-box (privacy=sample)
    dirac_guesses: int = 250  # white-box: a side
    black_box: bool = True  # False: the white-box audit alone (privacy=sample)
    seed: int = 0
    shadow_rounds: int | None = None  # None: as the target trained
    surrogate_epochs: int = 10  # distilling a surrogate from a soft-label upload
    bootstrap: int = 200


def audit_run(run_dir: str | Path, settings: AuditSettings) -> dict[str, Any]:
    """The audits of one client of a finished run; a JSON-ready dict."""
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
    sample_dp = cfg.privacy.mode == "sample"
    if not (settings.black_box or sample_dp):
        raise ConfigError("--white-box-only", cfg.privacy.mode, "a run with privacy=sample")
    view = ServerView(cfg, data, pid, strategy.reply_kind, settings)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "strategy": cfg.strategy["name"],
        "view": view.describe(),
        "privacy": cfg.privacy.mode,
        "epsilon": _run_epsilon(run_dir),
        "client": pid,
        "settings": asdict(settings),
    }
    white = None
    if sample_dp:  # the check of the accountant: first, and the headline
        rounds = trained_rounds(run_dir, cfg, pid)
        white = white_box(view, client_recipe(run_dir, cfg, data, pid, view.kind, rounds), settings)
    if settings.black_box:
        target = load_student(run_dir, plain, data, pid)
        recipe = client_recipe(run_dir, cfg, data, pid, view.kind, settings.shadow_rounds)
        result.update(black_box(view, recipe, target, settings))
    if white is not None:
        black = result.pop("epsilon_lower_bound", None)
        result["epsilon_lower_bound"] = white
        if black is not None:
            result["black_box_lower_bound"] = black
    result["seconds"] = time.perf_counter() - started
    return result


def black_box(
    view: ServerView, recipe: ClientRecipe, target: nn.Module, settings: AuditSettings
) -> dict[str, Any]:
    """Threshold and LiRA against the target's upload; the shadows' one-run bound."""
    count = settings.shadows or (64 if recipe.rounds == 1 else 8)
    cand = Candidates.draw(view.data, view.pid, settings.candidates, settings.seed)
    target_phi = view.phi(view.server_model(target, "target"), cand.x, cand.y)
    canaries = input_canaries(view.data, settings.canaries, settings.seed)
    shadows = train_shadows(view, recipe, cand, canaries, count, settings.seed)
    rng = numpy_rng(settings.seed, "audit-bootstrap")
    lira = lira_scores(target_phi, shadows.phi, shadows.included)
    bound = one_run_bound(shadows, settings.guesses, view.cfg.privacy.delta)
    return {
        "members": int(cand.member.sum()),
        "non_members": int((cand.member == 0).sum()),
        "shadow_recipe": recipe.describe(),
        "attacks": {
            "threshold": attack_summary(cand.member, target_phi, rng, settings.bootstrap),
            "lira": attack_summary(cand.member, lira, rng, settings.bootstrap),
        },
        "epsilon_lower_bound": bound,
    }


def white_box(view: ServerView, recipe: ClientRecipe, settings: AuditSettings) -> dict[str, Any]:
    """The target client's DP-SGD, replayed from its own initialisation with Dirac
    canaries (fedkd/audit/canaries.py)."""
    x, y = view.data.client_data(view.pid)
    model = new_student(view.cfg, view.data, view.pid)
    dirac = DiracSettings(settings.dirac_canaries, settings.dirac_guesses, settings.seed)
    gen = torch_generator(settings.seed, "audit-dirac-train")
    started = time.perf_counter()
    out = dirac_audit(model, x, y, recipe, gen, dirac, view.cfg.privacy.delta)
    return {**out, "recipe": recipe.describe(), "seconds": time.perf_counter() - started}


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

    def server_model(self, student: nn.Module, tag: str) -> nn.Module:
        """The server's model of `student`: it, or a surrogate distilled from its upload."""
        return student if self.kind == REPLY_WEIGHTS else self.surrogate(student, tag)

    @staticmethod
    def phi(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        return logit_confidence(predict_logits(model, x), y)

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

    def shadow_epsilon(self, recipe: ClientRecipe, n: int) -> float | None:
        """The accountant's epsilon for `recipe`'s DP-SGD steps on n examples."""
        if recipe.dp is None:
            return None
        dp = recipe.dp
        q, steps = dp_steps_per_round(n, dp.batch_size, dp.epochs)
        pv = self.cfg.privacy
        return gaussian_epsilon(pv.noise_multiplier, [(q, recipe.rounds * steps)], pv.delta)


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
