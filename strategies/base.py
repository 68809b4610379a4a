"""The round loop every fedkd strategy shares, with one hook per step.

A strategy is a Flower `Strategy` (configure_train / aggregate_train / ...), so tests
can feed `aggregate_train` crafted replies. `run()` owns the loop:

    sample_clients -> proxy subset -> plan + payload per client -> (grid)
    -> check_payload per reply -> aggregate (update the server model)
    -> evaluate -> record (with lifelong metrics) -> task-end hooks -> checkpoint

Subclasses override hooks, never the loop. Replies are validated and sorted by
partition id before aggregation (float sums depend on order); invalid ones are
logged and counted in `rejected`, client errors in `failed`, missing ones in `late`.
The lifelong mitigation (`lifelong.mitigation`) plugs into the same hooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig
from torch import nn

from fedkd.checkpoint import config_digest, save_checkpoint
from fedkd.comm.codecs import payload_bytes
from fedkd.data.federated import FederatedData
from fedkd.errors import ConfigError
from fedkd.lifelong import LifelongTracker
from fedkd.mitigations import build_mitigation
from fedkd.privacy import gaussian_epsilon
from fedkd.protocol import (
    CONFIG,
    INFO,
    REPLY_LOGITS,
    ROLE_LEARN,
    TRAIN,
    ClientReply,
    InvalidReply,
    ProxySegment,
    RoundPlan,
    reply_metrics,
)
from fedkd.seeding import derive_seed, numpy_rng, torch_generator
from fedkd.training import accuracy, distill_to_targets

log = logging.getLogger("fedkd.server")


def sample_partitions(seed: int, rnd: int, population: list[int], k: int) -> list[int]:
    """Clients of round `rnd`: a pure function of (seed, round), sorted by partition id."""
    pool = sorted(population)
    if k >= len(pool):
        return pool
    chosen = numpy_rng(seed, rnd, "client-sampling").choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in chosen)


def error_summary(reason: str) -> str:
    """The line of a client's error report that says what went wrong (Ray wraps the
    exception's message in a traceback)."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Message:" in ln:
            return ln.split("Message:", 1)[1].strip().rstrip("'>").strip()[:300]
    return (lines[-1] if lines else "no reason given")[:300]


@dataclass
class ServerContext:
    """What a strategy gets in `setup()`."""

    cfg: dict
    data: FederatedData
    device: str
    out_dir: Path


@dataclass
class RoundLedger:
    """Book-keeping of the round in flight."""

    round: int
    sampled: list[int]
    segments: list[ProxySegment]
    bytes_down: int = 0
    plans: dict[int, RoundPlan] = field(default_factory=dict)


class FederatedStrategy(Strategy):
    """Base class: the loop, reply validation, recording and checkpointing."""

    reply_kind: str = REPLY_LOGITS
    uses_clients: bool = True
    uses_proxy: bool = True  # False: clients do no proxy work and the subset is empty
    has_server_model: bool = True  # False: no teacher or global model (local)

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.name: str = cfg["strategy"]["name"]
        self.seed = int(cfg["seed"])
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.ledger: RoundLedger | None = None
        self.mitigation = build_mitigation(cfg)
        self._round_x: tuple[int, torch.Tensor] | None = None
        self._student_baselines: list[list[float]] = []  # students' b_j, as clients report it
        self.ray_nodes: set[str] = set()  # Ray nodes the clients ran on (simulation)
        self.last_round = 0  # the last finished round (a restored checkpoint's, on resume)
        self.client_epsilon: dict[int, float] = {}  # privacy.mode=sample: as clients report
        self.dp_rounds = 0  # privacy.mode=client: noised aggregations so far

    # ------------------------------------------------------------------ set-up
    @classmethod
    def check_config(cls, cfg: DictConfig) -> None:
        """Reject settings this strategy cannot serve (raise ConfigError)."""
        from fedkd.mitigations import MITIGATIONS

        privacy = cfg.privacy.mode
        if privacy != "none" and not cls.uses_clients:
            raise ConfigError("privacy.mode", privacy, f"none: {cfg.strategy.name} has no clients")
        if privacy == "client" and cls.reply_kind != REPLY_LOGITS:
            raise ConfigError(
                "privacy.mode",
                privacy,
                "none or sample: client-level DP on uploads applies to soft-label "
                f"strategies (dsfl, fedmd), and {cfg.strategy.name} sends no soft labels",
            )

        name = cfg.lifelong.mitigation
        mit = MITIGATIONS.get(name)
        if mit is None:
            return  # validate() reports unknown names
        has_model = cls.has_server_model
        if (mit.needs_server_model and not has_model) or (
            mit.needs_clients and not cls.uses_clients
        ):
            why = (
                "it has no server model"
                if mit.needs_server_model and not has_model
                else "it trains no clients"
            )
            raise ConfigError(
                "lifelong.mitigation", name, f"a mitigation that fits {cfg.strategy.name}: {why}"
            )

    def setup(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.data = ctx.data
        self.device = ctx.device
        self.stream = ctx.data.stream
        T = ctx.data.num_tasks
        self.trackers = (LifelongTracker(T), LifelongTracker(T, "student_"))

    def connect(self, partitions: dict[int, int]) -> None:
        """Register the node id -> partition id map found by the handshake."""
        self.partition_of = dict(partitions)
        self.node_of = {pid: node for node, pid in partitions.items()}

    @property
    def server_model(self) -> nn.Module | None:
        """The model the server evaluates (teacher, global model); None if there is none."""
        return None

    # ------------------------------------------------------------------- hooks
    def sample_clients(self, rnd: int) -> list[int]:
        return sample_partitions(
            self.seed, rnd, list(self.node_of), int(self.cfg["clients_per_round"])
        )

    def proxy_segments(self, rnd: int) -> list[ProxySegment]:
        """The round's proxy subset: the current task's pool, plus a mitigation's extras."""
        segments = []
        if self.uses_proxy or self.mitigation.needs_proxy:
            task = self.stream.global_task(rnd)
            pool = self.data.proxy_pool_size(task)
            sub = self.cfg["proxy"]["subset_size"]
            count = pool if sub is None else min(int(sub), pool)
            segments.append(ProxySegment(task, derive_seed(self.seed, rnd, "proxy-subset"), count))
        return segments + self.mitigation.extra_segments(self, rnd)

    def plan(self, rnd: int, pid: int) -> RoundPlan:
        """A client's work this round (task, role, hyper-parameters, proxy subset)."""
        tr, kd = self.cfg["train"], self.cfg["distill"]
        plan = RoundPlan(
            round=rnd,
            task=self.stream.client_task(rnd, pid),
            role=ROLE_LEARN,
            reply=self.reply_kind,
            proxy=tuple(self.ledger.segments),
            codec=getattr(self, "codec", "float16"),
            epochs=int(tr["epochs"]),
            batch_size=int(tr["batch_size"]),
            lr=float(tr["lr"]),
            momentum=float(tr["momentum"]),
            weight_decay=float(tr["weight_decay"]),
            alpha=float(kd["alpha"]),
            temperature=float(kd["temperature"]),
        )
        return self.mitigation.adjust_plan(self, rnd, pid, plan)

    def broadcast(self, rnd: int) -> dict[str, ArrayRecord]:
        """ArrayRecords sent to every sampled client this round (teacher knowledge)."""
        return {}

    def check_payload(self, content: RecordDict) -> ArrayRecord | None:
        """Validate a reply's arrays; raise InvalidReply. Returns what to aggregate."""
        return None

    def aggregate(self, rnd: int, replies: list[ClientReply]) -> tuple[ArrayRecord | None, dict]:
        """Fold valid replies (sorted by partition id) into the server state."""
        raise NotImplementedError

    def evaluate(self, rnd: int) -> dict[str, Any]:
        """The server model on every task's test data (teacher_accuracy: their mean)."""
        model = self.server_model
        if model is None:
            return {"teacher_accuracy": None, "task_accuracy": None}
        accs = [accuracy(model, x, y, device=self.device) for x, y in self.data.task_tests]
        return {"teacher_accuracy": float(np.mean(accs)), "task_accuracy": accs}

    def state_dict(self) -> dict[str, Any]:
        """Server state for the checkpoint (teacher weights, strategy state)."""
        return {}

    # --------------------------------------------------------------- helpers
    @property
    def round_proxy_x(self) -> torch.Tensor:
        """The proxy images of the round in flight (built once per round)."""
        assert self.ledger is not None, "no round in flight"
        if self._round_x is None or self._round_x[0] != self.ledger.round:
            self._round_x = (self.ledger.round, self.data.proxy_inputs(self.ledger.segments))
        return self._round_x[1]

    def distill_server_model(
        self,
        model: nn.Module,
        target: torch.Tensor,
        rnd: int,
        optimizer: torch.optim.Optimizer | None = None,
        x: torch.Tensor | None = None,
    ) -> float:
        """Distill `model` toward `target` on the round's proxy subset, or on `x`
        (plus the mitigation's remembered items, if any)."""
        kd = self.cfg["distill"]
        x = self.round_proxy_x if x is None else x
        x, t, w = self.mitigation.teacher_batch(self, x, target)
        return distill_to_targets(
            model,
            x,
            t,
            temperature=float(kd["temperature"]),
            epochs=int(kd["server_epochs"]),
            lr=float(kd["server_lr"]),
            batch_size=int(kd["server_batch_size"]),
            generator=torch_generator(self.seed, rnd, "teacher-distill"),
            device=self.device,
            optimizer=optimizer,
            weights=w,
        )

    def begin_round(self, rnd: int) -> RoundLedger:
        sampled = self.sample_clients(rnd) if self.uses_clients else []
        self.ledger = RoundLedger(rnd, sampled, [])
        self.ledger.segments = self.proxy_segments(rnd)
        self.mitigation.begin_round(self, rnd)
        return self.ledger

    # ------------------------------------------------- one round, without transport
    def prepare_round(self, rnd: int) -> list[tuple[int, RecordDict]]:
        """Sample the round's clients and build each one's download."""
        ledger = self.begin_round(rnd)
        if not ledger.sampled:
            return []
        shared = self.broadcast(rnd)
        downloads = []
        for pid in ledger.sampled:
            plan = self.plan(rnd, pid)
            payload = self.mitigation.client_payload(self, rnd, pid, plan, dict(shared))
            ledger.plans[pid] = plan
            ledger.bytes_down += sum(payload_bytes(r) for r in payload.values())
            downloads.append((pid, RecordDict({CONFIG: plan.to_record(), **payload})))
        return downloads

    def parse_reply(
        self, pid: int, content: RecordDict, seen: set[int] | None = None
    ) -> ClientReply:
        """Validate one client's upload; raise InvalidReply, naming what is wrong."""
        if self.ledger.sampled and pid not in self.ledger.sampled:
            raise InvalidReply(f"partition {pid} was not sampled this round")
        if seen is not None and pid in seen:
            raise InvalidReply(f"second reply from partition {pid}")
        metrics = reply_metrics(content, self.data.num_tasks)
        payload = self.check_payload(content)
        up = sum(payload_bytes(r) for r in content.array_records.values())
        info = {k: str(v) for k, v in content.config_records.get(INFO, {}).items()}
        return ClientReply(pid, int(metrics["num-examples"]), metrics, payload, up, info)

    def conclude(
        self,
        rnd: int,
        valid: list[ClientReply],
        *,
        failed: int,
        rejected: int,
        late: int,
        bytes_up: int,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Aggregate the valid replies (in partition order) and summarise the round."""
        valid = sorted(valid, key=lambda r: r.partition_id)
        aggregated, extra = None, {}
        need = int(self.cfg["faults"]["min_replies"])
        skipped = self.uses_clients and len(valid) < need
        if skipped:
            log.warning(
                "round %d: %d valid replies, fewer than faults.min_replies=%d; "
                "round skipped, the server state is unchanged",
                rnd,
                len(valid),
                need,
            )
        else:
            aggregated, extra = self.aggregate(rnd, valid)

        def values(key: str) -> list[float]:
            return [float(r.metrics[key]) for r in valid if key in r.metrics]

        accs, losses, compute = (
            values("test-accuracy"),
            values("train-loss"),
            values("compute-seconds"),
        )
        stats = {
            "clients": len(self.ledger.sampled),
            "replies": len(valid),
            "rejected": rejected,
            "failed": failed,
            "late": late,
            "skipped": int(skipped),
            "bytes_up": bytes_up,
            "bytes_down": self.ledger.bytes_down,
            "client_accuracy_mean": float(np.mean(accs)) if accs else None,
            "client_accuracy_min": float(np.min(accs)) if accs else None,
            "client_accuracy_max": float(np.max(accs)) if accs else None,
            "client_loss_mean": float(np.mean(losses)) if losses else None,
            "client_compute_seconds": float(np.sum(compute)) if compute else None,
            **extra,
        }
        rows = [r.metrics["task-accuracy"] for r in valid if "task-accuracy" in r.metrics]
        if rows:
            stats["student_task_accuracy"] = [float(v) for v in np.mean(np.array(rows), axis=0)]
        for r in valid:
            if "dp-epsilon" in r.metrics:
                self.client_epsilon[r.partition_id] = float(r.metrics["dp-epsilon"])
            if r.info.get("ray-node"):
                self.ray_nodes.add(r.info["ray-node"])
            if "initial-task-accuracy" in r.metrics:
                self._student_baselines.append(list(r.metrics["initial-task-accuracy"]))
        stats.update(self.privacy_stats())
        return aggregated, MetricRecord({k: v for k, v in stats.items() if v is not None})

    def privacy_stats(self) -> dict[str, float]:
        """The privacy spent so far (fedkd/privacy/): epsilon at delta, for the worst-off
        client's data (sample), or for any client's participation (client)."""
        pv = self.cfg["privacy"]
        if pv["mode"] == "none":
            return {}
        sigma, delta = float(pv["noise_multiplier"]), float(pv["delta"])
        if pv["mode"] == "sample":
            eps = max(self.client_epsilon.values(), default=0.0)
        else:
            rate = int(self.cfg["clients_per_round"]) / int(self.cfg["num_clients"])
            eps = gaussian_epsilon(sigma, [(rate, self.dp_rounds)], delta)
        return {"epsilon": eps, "delta": delta, "noise_multiplier": sigma}

    # -------------------------------------------------------- Flower Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return [
            Message(
                content,
                dst_node_id=self.node_of[pid],
                message_type=TRAIN,
                group_id=str(server_round),
            )
            for pid, content in self.prepare_round(server_round)
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.ledger is None or self.ledger.round != server_round:
            self.begin_round(server_round)  # called without configure_train (tests)
        replies = list(replies)
        valid: list[ClientReply] = []
        seen: set[int] = set()
        failed = rejected = bytes_up = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                log.warning(
                    "round %d: client error from node %s: %s",
                    server_round,
                    node,
                    error_summary(msg.error.reason),
                )
                continue
            bytes_up += sum(payload_bytes(r) for r in msg.content.array_records.values())
            try:
                pid = self.partition_of.get(node)
                if pid is None:
                    raise InvalidReply(f"unknown node {node}")
                reply = self.parse_reply(pid, msg.content, seen)
            except InvalidReply as exc:
                rejected += 1
                log.warning("round %d: rejected reply from node %s: %s", server_round, node, exc)
                continue
            seen.add(pid)
            valid.append(reply)
        late = max(0, len(self.ledger.sampled) - len(replies))
        return self.conclude(
            server_round, valid, failed=failed, rejected=rejected, late=late, bytes_up=bytes_up
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Students report test accuracy in their train replies: no extra round trip."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("strategy %s (%s)", self.name, type(self).__name__)

    # ----------------------------------------------------------------- the loop
    def run(self, grid: Grid, recorder: Any) -> dict[str, Any]:
        """Run the rounds after `self.last_round` (0, or a restored checkpoint's);
        returns the lifelong summary (accuracy matrices, metrics)."""
        rounds = int(self.cfg["rounds"])
        timeout = self.cfg["simulation"]["round_timeout"]
        teacher, students = self.trackers
        if self.last_round == 0 and self.server_model is not None:
            teacher.baseline = self.evaluate(0)["task_accuracy"]  # b_j: before any training
        for rnd in range(self.last_round + 1, rounds + 1):
            start = time.perf_counter()
            messages = list(self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
            sent = time.perf_counter()
            replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
            received = time.perf_counter()
            _, metrics = self.aggregate_train(rnd, replies)
            row: dict[str, Any] = {"round": rnd, "task": self.stream.global_task(rnd)}
            row.update(dict(metrics) if metrics else {})
            evaluation = self.evaluate(rnd)
            task, end = self.stream.global_task(rnd), self.stream.is_task_end(rnd, rounds)
            if self._student_baselines:
                students.baseline = list(np.mean(np.array(self._student_baselines), axis=0))
            row.update({k: v for k, v in evaluation.items() if k != "task_accuracy"})
            row.update(teacher.round(task, evaluation.get("task_accuracy"), end))
            row.update(students.round(task, row.pop("student_task_accuracy", None), end))
            if end and task < self.data.num_tasks - 1:
                self.mitigation.on_task_end(self, task)
            row["wall_seconds"] = time.perf_counter() - start
            row["clients_seconds"] = received - sent  # from the first send to the last reply
            row["server_seconds"] = row["wall_seconds"] - row["clients_seconds"]
            recorder.log_round(row)
            self.last_round = rnd
            self.checkpoint(rnd)
        return {**teacher.final(), **students.final(), "ray_nodes": len(self.ray_nodes)}

    # ----------------------------------------------------- checkpoint and resume
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (the checkpoint's strategy state)."""

    def checkpoint_state(self, rnd: int) -> dict[str, Any]:
        """Everything the server needs to continue after round `rnd`."""
        teacher, students = self.trackers
        return {
            "round": rnd,
            "strategy": self.name,
            "config_digest": config_digest(self.cfg),
            "state": self.state_dict(),
            "mitigation": self.mitigation.state_dict(),
            "trackers": [t.state_dict() for t in (teacher, students)],
            "student_baselines": self._student_baselines,
            "ray_nodes": sorted(self.ray_nodes),
            "client_epsilon": dict(self.client_epsilon),
            "dp_rounds": self.dp_rounds,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next round run() plays is ckpt["round"] + 1."""
        self.load_state_dict(ckpt["state"])
        self.mitigation.load_state_dict(ckpt["mitigation"], self)
        for tracker, state in zip(self.trackers, ckpt["trackers"], strict=True):
            tracker.load_state_dict(state)
        self._student_baselines = [list(b) for b in ckpt["student_baselines"]]
        self.ray_nodes = set(ckpt["ray_nodes"])
        self.client_epsilon = {int(k): float(v) for k, v in ckpt["client_epsilon"].items()}
        self.dp_rounds = int(ckpt["dp_rounds"])
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        self.last_round = int(ckpt["round"])

    def checkpoint(self, rnd: int) -> None:
        """Write the server state atomically after each round."""
        if self.cfg["output"]["checkpoint"]:
            save_checkpoint(self.ctx.out_dir, self.checkpoint_state(rnd))
