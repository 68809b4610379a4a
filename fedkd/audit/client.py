"""Train a student as the run's clients train it, for the audit's shadows and canaries.

A round of local training, as fedkd/local_round.py `train_round` does it:

    sequential schedule   KD epochs on the teacher's soft labels first, then the
                          private steps without KD
    joint schedule        KD interleaved with the private steps
    privacy=sample        the private steps are `dp_train_student` (DP-SGD, secret noise)

What the audit can only approximate, since a run keeps its final state alone:

    teacher               the run's final teacher (checkpoint) gives the soft labels of
                          every round after the first; the clients had each round's own.
                          broadcast=consensus, proxy subsets and download_size are read
                          as the whole proxy set with the teacher's labels.
    fedavg start          the global model before the last round, rebuilt exactly as the
                          server averaged it, from every client's previous state (weighted
                          by shard size; `start_check` says how well the same rebuild of
                          the final global model matches the checkpoint)
    mitigations           left out (their extra terms are not replayed)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedkd.checkpoint import CHECKPOINT, read_checkpoint
from fedkd.client_store import ROUND, ClientStore
from fedkd.comm.codecs import decode, encode
from fedkd.config import FedKDConfig
from fedkd.data.federated import FederatedData
from fedkd.loss_terms import TeacherKD
from fedkd.models import create_model
from fedkd.privacy.dpsgd import DPSGD, StepAudit, dp_train_student
from fedkd.privacy.noise import DPNoise
from fedkd.protocol import SOFT_LABELS
from fedkd.training import LocalTraining, distill_to_targets, soft_labels, train_student


@dataclass
class ClientRecipe:
    """How one client of the run trains: its local settings, DP-SGD, what it learns from."""

    hp: LocalTraining
    dp: DPSGD | None  # None: no DP-SGD
    rounds: int  # rounds of local training to replay
    proxy_x: torch.Tensor
    teacher_probs: torch.Tensor | None  # soft labels on proxy_x from round 2 on
    start: dict[str, torch.Tensor] | None  # fedavg: the broadcast model, every round
    start_check: float | None = None  # fedavg: max |rebuilt - saved| final global model

    def describe(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "schedule": self.hp.schedule,
            "dp_sgd": self.dp is not None,
            "teacher": "none" if self.teacher_probs is None else "the run's final teacher",
            "start": "own student" if self.start is None else "global model before the last round",
            "start_check": self.start_check,
        }

    def train(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        audit: StepAudit | None = None,
    ) -> int:
        """Every round of local training in place; returns the DP steps taken."""
        steps = 0
        for r in range(self.rounds):
            if self.start is not None:
                model.load_state_dict(self.start)
            first = r == 0 and self.start is None  # an untrained teacher sends nothing
            teacher = None if first else self.teacher_probs
            steps += self.round(model, x, y, generator, teacher, audit)
        return steps

    def round(self, model, x, y, generator, teacher, audit) -> int:
        hp, proxy_x = self.hp, self.proxy_x
        if hp.schedule == "sequential" and teacher is not None:  # FedMD's digest, then CE
            opt = torch.optim.SGD(model.parameters(), lr=hp.kd_lr, momentum=0.0)
            distill_to_targets(
                model,
                proxy_x,
                teacher,
                temperature=hp.temperature,
                epochs=hp.kd_epochs,
                lr=hp.kd_lr,
                batch_size=hp.kd_batch_size,
                generator=generator,
                optimizer=opt,
                shuffle=hp.kd_shuffle,
            )
            teacher = None
        if self.dp is None:
            terms = [] if teacher is None else [TeacherKD(proxy_x, teacher, hp.alpha)]
            train_student(model, x, y, hp, generator, terms)
            return 0
        _, steps = dp_train_student(
            model, x, y, hp, self.dp, generator, proxy_x, teacher, noise=DPNoise(), audit=audit
        )
        return steps


def client_recipe(
    run_dir: Path,
    cfg: FedKDConfig,
    data: FederatedData,
    pid: int,
    kind: str,
    rounds: int | None = None,
) -> ClientRecipe:
    """The target client's recipe, read from the run (see the module docstring)."""
    from fedkd.protocol import REPLY_WEIGHTS

    hp = LocalTraining.from_config(cfg.train, cfg.distill)
    dp = DPSGD.from_config(cfg.privacy, hp) if cfg.privacy.mode == "sample" else None
    store = ClientStore(cfg.simulation.client_state_dir or run_dir / "client_state")
    ckpt = _server_state(run_dir)
    proxy_x = data.proxy_x
    if kind == REPLY_WEIGHTS:
        start, check = _global_before_last_round(store, cfg, data, ckpt.get("model"))
        return ClientRecipe(hp, dp, rounds or 1, proxy_x, None, start, check)
    teacher = _teacher_probs(cfg, data, ckpt.get("teacher"), proxy_x)
    rounds = rounds or trained_rounds(run_dir, cfg, pid)
    return ClientRecipe(hp, dp, rounds, proxy_x, teacher, None)


def trained_rounds(run_dir: Path, cfg: FedKDConfig, pid: int) -> int:
    """Rounds the client trained in: under privacy=sample, the DP rounds its ledger
    holds (every release, replays included); else, or without a ledger, the run's
    rounds scaled by the share of clients a round samples (an estimate)."""
    from fedkd.node_ledger import NodeLedger, simulation_ledger_file

    if cfg.privacy.mode == "sample":
        root = cfg.simulation.client_state_dir or run_dir / "client_state"
        entries = NodeLedger(root, pid, simulation_ledger_file(pid)).entries()
        if any(e.steps > 0 for e in entries):
            return sum(e.steps > 0 for e in entries)
    return max(1, round(cfg.rounds * min(1.0, cfg.clients_per_round / cfg.num_clients)))


def _server_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return {}
    ckpt = read_checkpoint(path)
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    return state if isinstance(state, dict) else {}


def _teacher_probs(
    cfg: FedKDConfig, data: FederatedData, weights: Any, proxy_x: torch.Tensor
) -> torch.Tensor | None:
    """The final teacher's soft labels on the proxy set, coded as the run sent them."""
    if not isinstance(weights, dict):
        return None
    m = cfg.model
    teacher = create_model(
        m.teacher,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        seed=(0,),
        **m.teacher_kwargs,
    )
    teacher.load_state_dict(weights)
    probs = soft_labels(teacher, proxy_x, cfg.distill.temperature)
    codec = cfg.strategy.get("download_codec") or cfg.strategy.get("codec", "float16")
    record = encode(probs, codec, SOFT_LABELS, kind="probs")
    return decode(record, SOFT_LABELS, codec, tuple(probs.shape), "probs")


def _global_before_last_round(
    store: ClientStore, cfg: FedKDConfig, data: FederatedData, saved: Any
) -> tuple[dict[str, torch.Tensor] | None, float | None]:
    """FedAvg's global model before the last round: the shard-size-weighted mean of the
    clients' states of round R - 1 (the server's average when every client replied and
    no clip or cap bound). The same mean of the round-R states is checked against the
    checkpoint's global model; its largest difference is returned beside it. Without
    every client's two states: the checkpoint's final global model, unchecked."""
    from strategies.fedavg import average_weights

    fallback = (saved if isinstance(saved, dict) else None), None
    latest, previous, sizes = [], [], []
    for pid in range(cfg.num_clients):
        now = store.load(pid)
        before = store.load(pid, before_round=cfg.rounds)
        if not now or not before or now.get(ROUND) != cfg.rounds:
            return fallback
        if before.get(ROUND) != cfg.rounds - 1 or "model" not in before:
            return fallback
        latest.append(now["model"])
        previous.append(before["model"])
        sizes.append(float(len(data.client_data(pid)[1])))
    check = None
    if isinstance(saved, dict):
        rebuilt = average_weights(latest, sizes)
        check = max(float((rebuilt[k].float() - saved[k].float()).abs().max()) for k in saved)
    return average_weights(previous, sizes), check
