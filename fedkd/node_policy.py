"""What a device agrees to do, whatever the server's round plan asks (a SuperNode's
node config; deployment only).

A deployed node otherwise does what each RoundPlan says: a server could ask a
soft-label node for its whole state dict (bypassing the upload clipping of
docs/privacy.md), or set epochs, batch size and privacy mode beyond anything the
device owner accepted. The node checks every plan, and the run's privacy settings,
before any training, and refuses one outside its policy with a ValueError that
names the setting, the plan's value and the node's limit; the server logs it as
that node's error and counts the reply failed.

    allow-replies         comma-separated: logits, weights (default: the run's
                          strategy's own reply kind; metrics-only replies always)
    max-epochs            local epochs per round, at most
    max-batch-size        local batch size, at most
    min-privacy           none < client < sample (only `sample`, DP-SGD on the
                          device, holds against the server itself)
    min-noise-multiplier  privacy.noise_multiplier at least (needs min-privacy)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fedkd.errors import ConfigError
from fedkd.protocol import REPLY_LOGITS, REPLY_NONE, REPLY_WEIGHTS, RoundPlan

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig

REPLY_KINDS = (REPLY_LOGITS, REPLY_WEIGHTS)
PRIVACY_ORDER = {"none": 0, "client": 1, "sample": 2}


def _positive_int(node_config: dict[str, Any], key: str) -> int | None:
    value = node_config.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ConfigError(f"node config {key}", value, "an integer >= 1")
    return value


@dataclass(frozen=True)
class NodePolicy:
    """A node's limits; None: no limit of its own (the run decides)."""

    allow_replies: tuple[str, ...] | None = None  # None: the run strategy's reply kind
    max_epochs: int | None = None
    max_batch_size: int | None = None
    min_privacy: str = "none"
    min_noise_multiplier: float | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "allow-replies",
        "max-epochs",
        "max-batch-size",
        "min-privacy",
        "min-noise-multiplier",
    )

    @classmethod
    def parse(cls, node_config: dict[str, Any]) -> NodePolicy:
        """The policy keys of a node config; a wrong value is one ConfigError."""
        allow = node_config.get("allow-replies")
        replies = None
        if allow is not None:
            kinds = tuple(k.strip() for k in str(allow).split(",") if k.strip())
            if not isinstance(allow, str) or not kinds or set(kinds) - set(REPLY_KINDS):
                raise ConfigError(
                    "node config allow-replies", allow, "logits, weights or logits,weights"
                )
            replies = tuple(sorted(set(kinds)))
        privacy = node_config.get("min-privacy", "none")
        if privacy not in PRIVACY_ORDER:
            raise ConfigError("node config min-privacy", privacy, "one of none, client, sample")
        noise = node_config.get("min-noise-multiplier")
        if noise is not None:
            if type(noise) not in (int, float) or not noise >= 0:
                raise ConfigError("node config min-noise-multiplier", noise, "a number >= 0")
            if privacy == "none":
                raise ConfigError(
                    "node config min-noise-multiplier",
                    noise,
                    "only with min-privacy=client or sample (a floor on their noise)",
                )
            noise = float(noise)
        return cls(
            allow_replies=replies,
            max_epochs=_positive_int(node_config, "max-epochs"),
            max_batch_size=_positive_int(node_config, "max-batch-size"),
            min_privacy=privacy,
            min_noise_multiplier=noise,
        )

    def allowed_replies(self, cfg: FedKDConfig) -> tuple[str, ...]:
        """The reply kinds this node sends in this run (metrics-only always)."""
        if self.allow_replies is not None:
            return self.allow_replies
        from fedkd.registry import import_plugins
        from strategies import STRATEGIES

        import_plugins(cfg.plugins)
        return (STRATEGIES.get(cfg.strategy["name"]).reply_kind,)

    def violations(self, plan: RoundPlan, cfg: FedKDConfig) -> list[str]:
        """Each way `plan` (and the run's privacy settings) break this policy."""
        out = []
        allowed = self.allowed_replies(cfg)
        if plan.reply != REPLY_NONE and plan.reply not in allowed:
            out.append(f"reply={plan.reply!r} is outside allow-replies={','.join(allowed)}")
        if self.max_epochs is not None and plan.training.epochs > self.max_epochs:
            out.append(f"epochs={plan.training.epochs} exceeds max-epochs={self.max_epochs}")
        batch = plan.training.batch_size
        if self.max_batch_size is not None and batch > self.max_batch_size:
            out.append(f"batch_size={batch} exceeds max-batch-size={self.max_batch_size}")
        pv = cfg.privacy
        if pv.mode == "sample":  # DP-SGD's own settings, where set, are the work done
            for key, value, cap, limit in (
                ("epochs", pv.epochs, self.max_epochs, "max-epochs"),
                ("batch_size", pv.batch_size, self.max_batch_size, "max-batch-size"),
            ):
                if value is not None and cap is not None and value > cap:
                    out.append(f"privacy.{key}={value} exceeds {limit}={cap}")
        if PRIVACY_ORDER[pv.mode] < PRIVACY_ORDER[self.min_privacy]:
            out.append(f"privacy.mode={pv.mode!r} is below min-privacy={self.min_privacy}")
        floor = self.min_noise_multiplier
        if floor is not None and pv.mode != "none" and pv.noise_multiplier < floor:
            out.append(
                f"privacy.noise_multiplier={pv.noise_multiplier} is below "
                f"min-noise-multiplier={floor}"
            )
        return out

    def check(self, plan: RoundPlan, cfg: FedKDConfig) -> None:
        """Raise ValueError (the server logs it, counts the reply failed) unless the
        plan is within this node's policy."""
        broken = self.violations(plan, cfg)
        if broken:
            raise ValueError(
                f"this node's policy refuses round {plan.round}'s plan: " + "; ".join(broken)
            )
