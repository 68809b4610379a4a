"""What a device agrees to do, whatever the server's round plan asks (a SuperNode's
node config; deployment only).

A deployed node otherwise does what each RoundPlan says: a server could ask a
soft-label node for its whole state dict (bypassing the upload clipping of
docs/privacy.md), switch its privacy off, or make it train for ever. The node checks
the run's config at the handshake and every plan before any training, and refuses
one outside its policy with one line naming the setting and the plan's value (the
node's own limit goes to its log only); the server logs it as that node's error.
Every cost a plan can carry is bounded, with defaults an owner may tighten:

    allow-replies         comma-separated: logits, weights (default: logits;
                          metrics-only replies always)
    max-epochs            local epochs (and KD epochs) per round (default 20)
    max-batch-size        local batch size (default 4096)
    max-steps             optimizer steps per round, all phases (default 20,000)
    max-items             proxy, teacher and memory items per round (default 100,000)
    max-segments          proxy, teacher and memory segments per round (default 64)
    max-download-bytes    arrays in one round's download (default 64 MiB)
    max-rounds            rounds in a run (default 10,000)
    min-privacy           none < client < sample (only `sample`, DP-SGD on the
                          device, holds against the server itself); any level above
                          none also requires secure (OS CSPRNG) noise and a noise floor
    min-noise-multiplier  that floor (default 0.5 with min-privacy; > 0)
    max-epsilon           the device's budget over every run (fedkd/node_ledger.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fedkd.errors import ConfigError
from fedkd.protocol import REPLY_LOGITS, REPLY_NONE, SEGMENTS, RoundPlan

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


def reply_kinds() -> list[str]:
    """The reply kinds fedkd's strategies declare (an owner's allow-replies names some)."""
    from strategies import STRATEGIES

    return sorted({STRATEGIES.get(name).reply_kind for name in STRATEGIES.names()} - {REPLY_NONE})


PRIVACY_ORDER = {"none": 0, "client": 1, "sample": 2}
NOISE_FLOOR = 0.5  # min-privacy without min-noise-multiplier
BUDGET_DELTA = 1e-5  # max-epsilon holds at this delta (or the run's, if smaller)

# policy key -> (attribute, default); every one an integer >= 1
LIMITS: dict[str, tuple[str, int]] = {
    "max-epochs": ("max_epochs", 20),
    "max-batch-size": ("max_batch_size", 4096),
    "max-steps": ("max_steps", 20_000),
    "max-items": ("max_items", 100_000),
    "max-segments": ("max_segments", 64),
    "max-download-bytes": ("max_download_bytes", 64 * 2**20),
    "max-rounds": ("max_rounds", 10_000),
}


def _positive_int(node_config: dict[str, Any], key: str, default: int) -> int:
    value = node_config.get(key, default)
    if type(value) is not int or value < 1:
        raise ConfigError(f"node config {key}", value, "an integer >= 1")
    return value


def _positive_number(node_config: dict[str, Any], key: str) -> float | None:
    value = node_config.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not (0 < value < math.inf):
        raise ConfigError(f"node config {key}", value, "a number > 0")
    return float(value)


@dataclass(frozen=True)
class NodePolicy:
    """A node's limits."""

    allow_replies: tuple[str, ...] = (REPLY_LOGITS,)
    max_epochs: int = LIMITS["max-epochs"][1]
    max_batch_size: int = LIMITS["max-batch-size"][1]
    max_steps: int = LIMITS["max-steps"][1]
    max_items: int = LIMITS["max-items"][1]
    max_segments: int = LIMITS["max-segments"][1]
    max_download_bytes: int = LIMITS["max-download-bytes"][1]
    max_rounds: int = LIMITS["max-rounds"][1]
    min_privacy: str = "none"
    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "allow-replies",
        *LIMITS,
        "min-privacy",
        "min-noise-multiplier",
        "max-epsilon",
    )

    @classmethod
    def parse(cls, node_config: dict[str, Any]) -> NodePolicy:
        """The policy keys of a node config; a wrong value is one ConfigError."""
        allow = node_config.get("allow-replies", REPLY_LOGITS)
        kinds = tuple(k.strip() for k in str(allow).split(",") if k.strip())
        if not isinstance(allow, str) or not kinds or set(kinds) - set(reply_kinds()):
            raise ConfigError(
                "node config allow-replies",
                allow,
                f"one or more of {', '.join(reply_kinds())}, comma-separated",
            )
        privacy = node_config.get("min-privacy", "none")
        if privacy not in PRIVACY_ORDER:
            raise ConfigError("node config min-privacy", privacy, "one of none, client, sample")
        noise = _positive_number(node_config, "min-noise-multiplier")
        if noise is not None and privacy == "none":
            raise ConfigError(
                "node config min-noise-multiplier",
                noise,
                "only with min-privacy=client or sample (a floor on their noise)",
            )
        limits = {attr: _positive_int(node_config, key, d) for key, (attr, d) in LIMITS.items()}
        return cls(
            allow_replies=tuple(sorted(set(kinds))),
            min_privacy=privacy,
            min_noise_multiplier=noise,
            max_epsilon=_positive_number(node_config, "max-epsilon"),
            **limits,
        )

    @property
    def noise_floor(self) -> float:
        """The least noise multiplier a run must use (0: no privacy asked)."""
        if self.min_privacy == "none":
            return 0.0
        return NOISE_FLOOR if self.min_noise_multiplier is None else self.min_noise_multiplier

    # ------------------------------------------------------------ the run's config
    def run_violations(self, cfg: FedKDConfig) -> list[str]:
        """Each way the run's config (checked at the handshake and every round)
        breaks this policy; each names keys only (the config holds the owner's values)."""
        from fedkd.registry import import_plugins
        from strategies import STRATEGIES

        import_plugins(cfg.plugins)  # the owner's plugins only (fedkd/node_config.py)
        out = []
        kind = STRATEGIES.get(cfg.strategy["name"]).reply_kind
        if kind != REPLY_NONE and kind not in self.allow_replies:
            out.append(f"the strategy's reply ({kind}) is outside allow-replies")
        if cfg.rounds > self.max_rounds:
            out.append("rounds exceeds max-rounds")
        t, d = cfg.train, cfg.distill
        kd = d.client_schedule == "sequential"
        if max(t.epochs, d.client_epochs if kd else 0) > self.max_epochs:
            out.append("train.epochs or distill.client_epochs exceeds max-epochs")
        if max(t.batch_size, d.client_batch_size if kd else 0) > self.max_batch_size:
            out.append("train.batch_size or distill.client_batch_size exceeds max-batch-size")
        pv = cfg.privacy
        if pv.mode == "sample":  # DP-SGD's own settings, where set, are the work done
            if pv.epochs is not None and pv.epochs > self.max_epochs:
                out.append("privacy.epochs exceeds max-epochs")
            if pv.batch_size is not None and pv.batch_size > self.max_batch_size:
                out.append("privacy.batch_size exceeds max-batch-size")
        if PRIVACY_ORDER[pv.mode] < PRIVACY_ORDER[self.min_privacy]:
            out.append("privacy.mode is below min-privacy")
        if self.min_privacy != "none":
            if not pv.noise_multiplier >= self.noise_floor:
                out.append("privacy.noise_multiplier is below the node's noise floor")
            if not pv.secure_noise:
                out.append("privacy.secure_noise is off: this node requires secret noise")
        return out

    # ------------------------------------------------------------ one round's plan
    def plan_violations(
        self, plan: RoundPlan, cfg: FedKDConfig, shard: int, nbytes: int
    ) -> list[str]:
        """Each way `plan` breaks this policy, for a node of `shard` private examples
        that was sent `nbytes` of arrays."""
        out = []
        if plan.reply != REPLY_NONE and plan.reply not in self.allow_replies:
            out.append(f"reply={plan.reply!r} is outside allow-replies")
        if not 1 <= plan.round <= cfg.rounds:
            out.append(f"round={plan.round} is outside the run's rounds")
        hp = plan.training
        kd = hp.schedule == "sequential"  # KD epochs and batches of their own
        if max(hp.epochs, hp.kd_epochs if kd else 0) > self.max_epochs:
            out.append(f"epochs={hp.epochs}/kd_epochs={hp.kd_epochs} exceed max-epochs")
        if max(hp.batch_size, hp.kd_batch_size if kd else 0) > self.max_batch_size:
            out.append(f"batch_size={hp.batch_size}/{hp.kd_batch_size} exceeds max-batch-size")
        segments = sum(len(getattr(plan, name)) for name in SEGMENTS)
        items = sum(s.count for name in SEGMENTS for s in getattr(plan, name))
        if segments > self.max_segments:
            out.append(f"{segments} proxy/teacher/memory segments exceed max-segments")
        if items > self.max_items:
            out.append(f"{items} proxy/teacher/memory items exceed max-items")
        if plan.teacher_count > plan.proxy_count + sum(s.count for s in plan.teacher_proxy):
            out.append(f"teacher_count={plan.teacher_count} exceeds the round's proxy items")
        if nbytes > self.max_download_bytes:
            out.append(f"a download of {nbytes} bytes exceeds max-download-bytes")
        steps = local_steps(plan, cfg, shard)
        if steps > self.max_steps:
            out.append("the local optimizer steps exceed max-steps")
        return out


def local_steps(plan: RoundPlan, cfg: FedKDConfig, shard: int) -> int:
    """An upper bound on the optimizer steps the plan asks of a node with `shard`
    private examples: local (or DP-SGD) epochs, sequential KD epochs, rehearsal."""
    from fedkd.privacy.dpsgd import DPSGD

    hp = plan.training

    def batches(n: int, size: int) -> int:
        return max(1, -(-n // size))

    epochs, batch = hp.epochs, hp.batch_size
    if cfg.privacy.mode == "sample":  # DP-SGD's own settings, each unset one the plan's
        dp = DPSGD.from_config(cfg.privacy, hp)
        epochs, batch = dp.epochs, dp.batch_size
    steps = epochs * batches(shard, batch)
    kd_items = plan.proxy_count + sum(s.count for s in plan.teacher_proxy)
    if hp.schedule == "sequential":
        steps += hp.kd_epochs * batches(kd_items, hp.kd_batch_size)
    memory = sum(s.count for s in plan.memory)
    if memory:
        steps += epochs * batches(memory, batch)
    return steps
