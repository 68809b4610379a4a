"""The client half of a strategy: what a client computes in its round.

A strategy (strategies/base.py) names its client half in `client_half`, in the same
file, and builds it with `Strategy.client`, once per client process, from the run's
config (on a device: the config its owner allows, fedkd/node_config.py). A half
answers two questions:

    terms(ctx)            the loss terms local training folds into CE (fedkd/loss_terms.py)
    upload(ctx, proxy_x)  the reply's payload: one ArrayRecord, sent under the
                          strategy's `reply_record` (None: the reply is metrics only)

Everything around it is generic (fedkd/local_round.py): loading the student, the
mitigation's own terms, DP-SGD, evaluation, metrics and the client store. The
download's records are in `ctx.arrays`, from a server that a device does not trust:
a half checks what it reads (`checked_array`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedkd.comm.codecs import encode
from fedkd.loss_terms import LossTerm, TeacherKD
from fedkd.protocol import LOGITS, InvalidReply, check_array
from fedkd.training import predict_logits

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound


class ClientHalf:
    """The soft-label client: KD toward the teacher's labels on the proxy items, and
    the student's logits on the round's proxy items as the reply."""

    # its terms are what DP-SGD trains (CE + teacher KD, fedkd/privacy/dpsgd.py); a
    # half with terms of its own says False, and privacy.mode=sample is refused
    dp_sgd: ClassVar[bool] = True

    def __init__(self, cfg: FedKDConfig, params: Any) -> None:
        self.cfg = cfg
        self.params = params  # the strategy's Params (conf/strategy/NAME.yaml)
        self.reply_kind = ""  # the strategy's (`Strategy.client`)
        self.reply_record: str | None = None

    def terms(self, ctx: ClientRound) -> list[LossTerm]:
        if ctx.teacher_probs is None:
            return []
        return [TeacherKD(ctx.kd_x, ctx.teacher_probs, ctx.training.alpha)]

    def upload(self, ctx: ClientRound, proxy_x: torch.Tensor) -> ArrayRecord:
        logits = predict_logits(ctx.student, proxy_x, device=ctx.device)
        return encode(logits, ctx.plan.codec, LOGITS, kind="logits")


class NoUpload(ClientHalf):
    """A client whose reply is metrics only (local training)."""

    def upload(self, ctx: ClientRound, proxy_x: torch.Tensor) -> ArrayRecord:
        raise RuntimeError("this strategy's reply carries no payload")


def checked_array(
    arrays: dict[str, ArrayRecord], record: str, key: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """A float32 array the server sent, shape- and finiteness-checked; ValueError
    names the record (what a client reads from a download)."""
    if record not in arrays:
        raise ValueError(f"the server's download has no {record!r} record")
    try:
        arr = check_array(arrays[record], key, shape, np.dtype(np.float32))
    except InvalidReply as exc:
        raise ValueError(f"malformed {record!r} from the server: {exc}") from None
    return torch.from_numpy(arr.copy())
