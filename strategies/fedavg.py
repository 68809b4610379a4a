"""FedAvg (McMahan et al. 2017): the weight-sharing baseline.

Clients start each round from the global model, train locally on their private data
(no distillation) and send their weights; the server averages them, weighted by
`num-examples`. The global model plays the teacher's role in the metrics.

A reply cannot replace the global model (model replacement, Bagdasaryan et al.
2020): the server refuses weights far from the broadcast (`max_update_ratio`) or
with meaningless BatchNorm statistics, clips every update to a norm bound
(`update_clip`, Sun et al. 2019) and caps each client's share of the weighted
average (`max_weight_share`), however many examples it declares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedkd.comm.npy import array_from_numpy
from fedkd.config import require
from fedkd.errors import ConfigError
from fedkd.models import create_model, with_activation
from fedkd.protocol import REPLY_WEIGHTS, WEIGHTS, ClientReply, InvalidReply, check_array
from fedkd.round import Round
from fedkd.training import on_device, soft_labels
from strategies.base import (
    STRATEGIES,
    ServerContext,
    Strategy,
    capped_weights,
    require_finite,
)
from strategies.client_half import ClientHalf
from strategies.robust import AggregationParams, robust_center

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound, Mitigation


def weights_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """`ArrayRecord(state)`, the same bytes, built without numpy's per-array cost."""
    return ArrayRecord({k: array_from_numpy(v.detach().numpy()) for k, v in state.items()})


class WeightsClient(ClientHalf):
    """A FedAvg client: local training from the global model; its weights as the reply."""

    def upload(self, ctx: ClientRound, proxy_x: torch.Tensor) -> ArrayRecord:
        return weights_record(on_device(ctx.student, "cpu").state_dict())


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def average_weights(
    states: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts; integer buffers are rounded back to integers."""
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        acc = sum(w / total * s[key].double() for s, w in zip(states, weights, strict=True))
        out[key] = like(acc, ref)
    return out


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`value` in `ref`'s dtype; integer buffers are rounded back to integers."""
    return value.to(ref.dtype) if ref.is_floating_point() else value.round().to(ref.dtype)


# num_batches_tracked may grow by at most this many batches in one client's round
MAX_BATCHES_PER_ROUND = 10**7
# Updates are clipped to this many times the broadcast weights' L2 norm. Honest
# ||update|| / ||broadcast|| measured (floating-point entries, BatchNorm statistics
# included): Fashion-MNIST, 1 local epoch, cnn_small 0.54 (round 1; 0.37, 0.28 after),
# 5 epochs 0.93; resnet8 1.19 (round 1, mostly running_var leaving its initial 1;
# parameters alone 0.17; round 2 0.29); experiment=smoke 0.25 (resnet8 0.52, FedDF
# 0.23). 3.0 leaves 2.5x over the largest.
UPDATE_CLIP = 3.0


def update_norm(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 norm of `state - reference` over the floating-point entries, in float64."""
    total = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            step = (state[key] - ref).flatten()
            total += float(torch.linalg.vector_norm(step, dtype=torch.float64)) ** 2
    return total**0.5


def clip_update(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], factor: float
) -> dict[str, torch.Tensor]:
    """`reference + factor * (state - reference)` on the floating-point entries."""
    return {
        key: like(ref.double() + factor * (state[key].double() - ref.double()), ref)
        if ref.is_floating_point()
        else state[key]
        for key, ref in reference.items()
    }


def check_batchnorm(key: str, value: torch.Tensor, ref: torch.Tensor) -> None:
    """BatchNorm statistics a model can use: a negative running variance or a batch
    count far from the broadcast one turns the global model's outputs into NaN
    (non-finite values are refused when the array is decoded)."""
    name = key.rsplit(".", 1)[-1]
    if name == "running_var" and bool((value < 0).any()):
        raise InvalidReply(f"array {key!r} holds negative running variances")
    if name == "num_batches_tracked" and value.numel():
        low, high = int(ref.min()), int(ref.min()) + MAX_BATCHES_PER_ROUND
        if not low <= int(value.min()) <= int(value.max()) <= high:
            raise InvalidReply(f"array {key!r} must lie in [{low}, {high}] (from the broadcast)")


def robust_weights(
    states: list[dict[str, torch.Tensor]], params: AggregationParams
) -> dict[str, torch.Tensor]:
    """Coordinate-wise median or trimmed mean of state dicts (unweighted)."""
    out = {}
    for key, ref in states[0].items():
        value = robust_center(torch.stack([s[key].double() for s in states]), params)
        out[key] = (
            value.round().to(ref.dtype) if not ref.is_floating_point() else value.to(ref.dtype)
        )
    return out


@dataclass
class FedAvgParams(AggregationParams):
    # a reply farther from the broadcast weights than this many times their L2 norm
    # is refused (honest local epochs move them by a fraction of it)
    max_update_ratio: float = 10.0
    # each update is clipped to this many times the broadcast weights' L2 norm
    # before averaging (measured honest ratios: see conf/strategy/fedavg.yaml)
    update_clip: float = UPDATE_CLIP
    # no client gets more of a weighted average than this (0.5: no majority)
    max_weight_share: float = 0.5

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        ratio, clip = self.max_update_ratio, self.update_clip
        require(ratio > 0, "strategy.max_update_ratio", ratio, "a number > 0")
        require(
            0 < clip <= ratio,
            "strategy.update_clip",
            clip,
            f"a number in (0, strategy.max_update_ratio={ratio:g}]",
        )
        share = self.max_weight_share
        require(0 < share <= 1, "strategy.max_weight_share", share, "a number in (0, 1]")


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    Params = FedAvgParams
    reply_kind = REPLY_WEIGHTS
    reply_record = WEIGHTS
    client_half = WeightsClient
    uses_proxy = False

    def __init__(self, cfg: FedKDConfig, params: FedAvgParams) -> None:
        super().__init__(cfg, params)
        self.p = params
        self._reference: tuple[int, dict[str, torch.Tensor], float] | None = None

    @classmethod
    def check_config(cls, cfg: FedKDConfig, mitigation: type[Mitigation]) -> None:
        super().check_config(cfg, mitigation)
        if len(set(cfg.model.students)) > 1:
            raise ConfigError(
                "model.students",
                list(cfg.model.students),
                f"a single architecture: {cfg.strategy['name']} averages weights, so every "
                "client must run the same model (use fedmd or dsfl for heterogeneous students)",
            )

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        m = self.cfg.model
        model = create_model(
            m.student_of(0),
            num_classes=self.data.num_classes,
            input_shape=self.data.input_shape,
            seed=(self.seed, "global-init"),
            **m.student_kwargs,
        )
        self.model: nn.Module = with_activation(model, self.cfg.privacy.activation).to(self.device)

    def broadcast(self, r: Round) -> dict[str, ArrayRecord]:
        return {WEIGHTS: ArrayRecord(cpu_state(self.model))}

    def check_payload(self, r: Round, content: RecordDict) -> dict[str, torch.Tensor]:
        """The reply's weights, decoded once here (clipped in `aggregate`)."""
        record = content.array_records.get(WEIGHTS)
        if record is None:
            raise InvalidReply(f"no ArrayRecord {WEIGHTS!r}")
        reference, scale = self.broadcast_reference(r)
        if set(record.keys()) != set(reference):
            raise InvalidReply("weights do not match the global model's parameter names")
        state = {}
        for key, ref in reference.items():
            arr = check_array(record, key, tuple(ref.shape), ref.numpy().dtype)
            state[key] = torch.from_numpy(arr)
            check_batchnorm(key, state[key], ref)
        distance, bound = update_norm(state, reference), self.p.max_update_ratio * scale
        if distance > bound:
            raise InvalidReply(f"weights {distance:.3g} from the broadcast model (> {bound:.3g})")
        return state

    def broadcast_reference(self, r: Round) -> tuple[dict[str, torch.Tensor], float]:
        """The weights broadcast in round r (aggregation comes after every check) and
        their L2 norm (at least 1), which bounds replies; computed once per round."""
        if self._reference is None or self._reference[0] != r.number:
            state = cpu_state(self.model)
            norm = sum(
                float((v.double() ** 2).sum()) for v in state.values() if v.is_floating_point()
            )
            self._reference = (r.number, state, max(norm**0.5, 1.0))
        return self._reference[1], self._reference[2]

    def payload_bytes_bound(self, r: Round) -> int:
        return ArrayRecord(self.broadcast_reference(r)[0]).count_bytes()

    def average(self, replies: list[ClientReply]) -> dict[str, torch.Tensor]:
        states = [r.arrays for r in replies]  # decoded by check_payload
        if self.p.robust:
            averaged = robust_weights(states, self.p)
        else:
            sizes = [r.num_examples for r in replies]
            averaged = average_weights(states, capped_weights(sizes, self.p.max_weight_share))
        for key, value in averaged.items():
            require_finite(value, f"averaged weight {key!r}")
        return averaged

    @property
    def server_model(self) -> nn.Module:
        return self.model

    def refine(self, r: Round, replies: list[ClientReply]) -> dict[str, Any]:
        """After averaging: nothing for FedAvg (FedDF distills here)."""
        return {}

    def clip_updates(self, r: Round, replies: list[ClientReply]) -> tuple[list[ClientReply], int]:
        """Each update (reply minus broadcast weights) scaled down to at most
        `update_clip` times the broadcast's norm, so that no reply, however far from
        the broadcast, moves the average (or FedDF's ensemble) further than its share
        of that bound; returns the replies and how many were clipped."""
        reference, scale = self.broadcast_reference(r)
        limit = self.p.update_clip * scale
        out, clipped = [], 0
        for reply in replies:
            norm = update_norm(reply.arrays, reference)
            if norm > limit:
                reply = replace(reply, arrays=clip_update(reply.arrays, reference, limit / norm))
                clipped += 1
            out.append(reply)
        return out, clipped

    def aggregate(self, r: Round, replies: list[ClientReply]) -> tuple[ArrayRecord, dict[str, Any]]:
        replies, clipped = self.clip_updates(r, replies)
        self.model.load_state_dict(self.average(replies))
        stats = {**self.refine(r, replies), "clipped_updates": clipped}
        if self.mitigation.distills_server_model and len(r.proxy_x):
            # anchor what the average knows now, on the round's subset, while the
            # mitigation adds what the server must not forget
            tau = self.cfg.distill.temperature
            own = soft_labels(self.model, r.proxy_x, tau, device=self.device)
            stats["memory_loss"] = self.distill_server_model(self.model, own, r)
        return ArrayRecord(cpu_state(self.model)), stats

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
