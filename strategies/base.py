"""The strategy interface: a federated algorithm, both halves, and nothing else.

A strategy decides, each round, which clients take part, which proxy items the
round uses, what each client is asked to do (`plan`) and sent (`broadcast`), what a
reply must contain (`check_payload`) and how replies update its own state
(`aggregate`). Its client half (`client_half`, strategies/client_half.py) says what a
client computes: its loss terms and its reply, of the kind the strategy declares
(`reply_kind` on the wire, `reply_record` the payload's ArrayRecord). Everything
around it lives elsewhere: the round loop, the reply tally and the checkpoint
(fedkd/round_loop.py, fedkd/tally.py, fedkd/server_state.py),
the privacy ledger (fedkd/privacy/ledger.py), lifelong evaluation
(fedkd/evaluation.py). Replies reach `aggregate` validated and sorted by partition
id, so tests can call it directly with crafted replies.

A new strategy is one file in strategies/ (a class registered with
`@STRATEGIES.register("name")`, its settings a `Params` dataclass that inherits its
parent's, its client half beside it) plus `conf/strategy/name.yaml`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedkd.errors import ConfigError
from fedkd.protocol import (
    KNOWLEDGE,
    REPLY_LOGITS,
    ROLE_LEARN,
    ClientReply,
    ProxySegment,
    RoundPlan,
)
from fedkd.registry import Registry
from fedkd.round import Round
from fedkd.seeding import derive_seed, numpy_rng, torch_generator
from fedkd.training import LocalTraining, distill_to_targets
from strategies.client_half import ClientHalf

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.data.federated import FederatedData
    from fedkd.mitigations import Mitigation
    from fedkd.privacy.ledger import PrivacyLedger

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategy.name", ("strategies",))


def sample_partitions(seed: int, rnd: int, population: list[int], k: int) -> list[int]:
    """Clients of round `rnd`: a pure function of (seed, round), sorted by partition id."""
    pool = sorted(population)
    if k >= len(pool):
        return pool
    chosen = numpy_rng(seed, rnd, "client-sampling").choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in chosen)


class UnsafeAggregate(RuntimeError):
    """An aggregate the server will not learn from (not finite): the round is skipped."""


def require_finite(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise UnsafeAggregate(f"the {what} holds NaN or Inf")


def capped_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """Weights in which no client holds more than `max_share` of the total, so that
    no declared size, however large, hands one client a weighted average.

    Water-filling: cap the largest shares, hand the excess to the others in
    proportion to their weights, repeat. Returned unchanged (the same numbers) when
    no client exceeds the cap; equal weights when the cap cannot be met (< 1/K)."""
    k, total = len(weights), float(sum(weights))
    if k == 0 or all(w <= max_share * total for w in weights):
        return list(weights)
    if max_share * k < 1 or total <= 0:
        return [1.0 / k] * k
    capped: set[int] = set()
    while True:
        shares = _spread(weights, capped, max_share)
        over = {i for i, s in enumerate(shares) if i not in capped and s > max_share}
        if not over:
            return shares
        capped |= over


def _spread(weights: Sequence[float], capped: set[int], max_share: float) -> list[float]:
    """`max_share` to each capped client, the rest in proportion to the others' weights."""
    free = [float(w) for i, w in enumerate(weights) if i not in capped]
    left = 1.0 - max_share * len(capped)
    total = sum(free)
    scale = iter([left * w / total if total > 0 else left / len(free) for w in free])
    return [max_share if i in capped else next(scale) for i in range(len(weights))]


@dataclass
class StrategyParams:
    """A strategy's own settings (conf/strategy/NAME.yaml); subclasses add fields."""

    name: str = ""

    def check(self, cfg: FedKDConfig) -> None:
        """Reject values this strategy cannot use (raise ConfigError)."""


@dataclass
class ServerContext:
    """What a strategy gets in `setup()`."""

    cfg: FedKDConfig
    data: FederatedData
    device: str
    mitigation: Mitigation
    privacy: PrivacyLedger


class Strategy:
    """Base class: defaults every strategy shares."""

    Params: ClassVar[type[StrategyParams]] = StrategyParams
    reply_kind: ClassVar[str] = REPLY_LOGITS  # plan.reply; what a device owner allows
    reply_record: ClassVar[str | None] = KNOWLEDGE  # the reply's payload record; None: none
    client_half: ClassVar[type[ClientHalf]] = ClientHalf
    uses_clients: ClassVar[bool] = True
    uses_proxy: ClassVar[bool] = True  # False: clients do no proxy work, no subset
    has_server_model: ClassVar[bool] = True  # False: no teacher or global model (local)
    codec = "float16"  # of the clients' uploads

    def __init__(self, cfg: FedKDConfig, params: StrategyParams) -> None:
        params.check(cfg)
        self.cfg = cfg
        self.params = params
        self.name = params.name
        self.seed = cfg.seed
        self.training = LocalTraining.from_config(cfg.train, cfg.distill)

    @classmethod
    def check_config(cls, cfg: FedKDConfig, mitigation: type[Mitigation]) -> None:
        """Reject settings outside the strategy's own that it cannot serve."""
        name, privacy = cfg.strategy["name"], cfg.privacy.mode
        if privacy != "none" and not cls.uses_clients:
            raise ConfigError("privacy.mode", privacy, f"none: {name} has no clients")
        if privacy == "client" and cls.reply_kind != REPLY_LOGITS:
            raise ConfigError(
                "privacy.mode",
                privacy,
                "none or sample: client-level DP on uploads applies to soft-label "
                f"strategies (dsfl, fedmd), and {name} sends no soft labels",
            )
        if privacy == "sample" and cls.uses_clients and not cls.client_half.dp_sgd:
            raise ConfigError(
                "privacy.mode",
                privacy,
                f"{'none or client' if cls.reply_kind == REPLY_LOGITS else 'none'}: "
                f"{name}'s clients add loss terms that DP-SGD does not train",
            )
        no_model = mitigation.needs_server_model and not cls.has_server_model
        if no_model or (mitigation.needs_clients and not cls.uses_clients):
            why = "it has no server model" if no_model else "it trains no clients"
            raise ConfigError(
                "mitigation", mitigation.name, f"a mitigation that fits {name}: {why}"
            )

    @classmethod
    def client(cls, cfg: FedKDConfig, params: StrategyParams) -> ClientHalf:
        """The client half, built on a client, replying as this strategy declares."""
        half = cls.client_half(cfg, params)
        half.reply_kind, half.reply_record = cls.reply_kind, cls.reply_record
        return half

    def setup(self, ctx: ServerContext) -> None:
        """Build models and state (after the config was checked, before round 1)."""
        self.ctx = ctx
        self.data = ctx.data
        self.device = ctx.device
        self.mitigation = ctx.mitigation

    @property
    def server_model(self) -> nn.Module | None:
        """The model the server evaluates (teacher, global model); None if there is none."""
        return None

    # ------------------------------------------------------------------ the hooks
    def sample_clients(self, rnd: int, population: list[int]) -> list[int]:
        return sample_partitions(self.seed, rnd, population, self.cfg.clients_per_round)

    def proxy_segments(self, rnd: int) -> list[ProxySegment]:
        """The round's subset of the current task's proxy pool."""
        task = self.data.stream.global_task(rnd)
        pool = self.data.proxy_pool_size(task)
        sub = self.cfg.proxy.subset_size
        count = pool if sub is None else min(sub, pool)
        return [ProxySegment(task, derive_seed(self.seed, rnd, "proxy-subset"), count)]

    def plan(self, r: Round, pid: int) -> RoundPlan:
        """A client's work this round (task, role, hyper-parameters, proxy subset)."""
        return RoundPlan(
            round=r.number,
            task=self.data.stream.client_task(r.number, pid),
            role=ROLE_LEARN,
            reply=self.reply_kind,
            proxy=tuple(r.segments),
            codec=self.codec,
            training=self.training,
        )

    def broadcast(self, r: Round) -> dict[str, ArrayRecord]:
        """ArrayRecords sent to every sampled client this round (teacher knowledge)."""
        return {}

    def check_payload(self, r: Round, content: RecordDict) -> Any:
        """Validate a reply's arrays; raise InvalidReply. Returns what to aggregate
        (`ClientReply.arrays`): the record, or what checking it decoded."""
        return None

    def payload_bytes_bound(self, r: Round) -> int:
        """The bytes of a well-formed reply payload this round (its upper bound)."""
        return 0

    def aggregate(self, r: Round, replies: list[ClientReply]) -> tuple[ArrayRecord | None, dict]:
        """Fold valid replies (sorted by partition id) into the strategy's state;
        returns the aggregate and round statistics for the metrics row."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Strategy state for the checkpoint (weights, optimizer, flags)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned."""

    # ------------------------------------------------------- shared by strategies
    def distill_server_model(
        self,
        model: nn.Module,
        target: torch.Tensor,
        r: Round,
        optimizer: torch.optim.Optimizer | None = None,
        x: torch.Tensor | None = None,
    ) -> float:
        """Distill `model` toward `target` on the round's proxy subset, or on `x`
        (plus the mitigation's remembered items, if any)."""
        kd = self.cfg.distill
        x = r.proxy_x if x is None else x
        x, t, w = self.mitigation.teacher_batch(x, target)
        require_finite(t, "distillation target")
        return distill_to_targets(
            model,
            x,
            t,
            temperature=kd.server_tau,
            epochs=kd.server_epochs,
            lr=kd.server_lr,
            batch_size=kd.server_batch_size,
            generator=torch_generator(self.seed, r.number, "teacher-distill"),
            device=self.device,
            optimizer=optimizer or self.server_optimizer(model),
            weights=w,
            shuffle=kd.shuffle,
        )

    def server_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer `distill.server_optimizer` names, for a server-side model."""
        kd = self.cfg.distill
        if kd.server_optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=kd.server_lr, momentum=kd.server_momentum)
        return torch.optim.Adam(model.parameters(), lr=kd.server_lr)
