"""Client-level DP on soft-label uploads: clip on the client, noise on the server.

The client centres each row of its logits (one per proxy item) and clips it to L2
norm `clip_norm` in a Flower mod attached to the train function only, so the whole
upload has L2 norm at most clip_norm * sqrt(n). The server does the same again (it
cannot trust clients), sums the K uploads and adds N(0, (noise_multiplier *
clip_norm * sqrt(n))^2) to every coordinate: the Gaussian mechanism on a sum whose
sensitivity to one client's upload is clip_norm * sqrt(n).

Why centre: every consumer of the mean (softmax, tempered softmax, ERA) ignores a
row's offset, so the offset carries nothing, yet it can take most of the clip
budget (a one-bit vote decodes to log-probabilities around -4, an untrained
student's logits share a large common offset). Centring is a projection, so it
cannot raise the sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from flwr.app import Context, Message, RecordDict

from fedkd.comm.codecs import recode
from fedkd.privacy.noise import DPNoise
from fedkd.protocol import CONFIG, KNOWLEDGE, REPLY_LOGITS, RoundPlan


def clip_rows(values: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale every row (last dim) of `values` down to L2 norm <= clip_norm."""
    norms = values.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return values * (clip_norm / norms).clamp(max=1.0)


def private_rows(values: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Every row centred (its mean removed) and clipped to L2 norm <= clip_norm."""
    return clip_rows(values - values.mean(dim=-1, keepdim=True), clip_norm)


def noisy_mean(
    uploads: torch.Tensor,
    clip_norm: float,
    noise_multiplier: float,
    noise: DPNoise,
    divisor: float | None = None,
) -> torch.Tensor:
    """(K, n, C) uploads -> (n, C): the sum of their centred, row-clipped values,
    with Gaussian noise calibrated to one client's L2 sensitivity on the sum, over
    `divisor` (the expected cohort under Poisson sampling, as DP-FedAvg divides: the
    actual K is a function of the secret cohort; None: K)."""
    k, n, _ = uploads.shape
    total = private_rows(uploads, clip_norm).sum(0)
    std = noise_multiplier * clip_norm * math.sqrt(n)
    return (total + noise.normal(total.shape, std)) / (k if divisor is None else divisor)


def clip_reply(plan: RoundPlan, content: RecordDict, clip_norm: float, num_classes: int) -> None:
    """Centre and clip the rows of a train reply's logits, in place (what leaves)."""
    records = content.array_records
    if plan.reply != REPLY_LOGITS or KNOWLEDGE not in records:
        return
    shape = (plan.proxy_count, num_classes)
    records[KNOWLEDGE] = recode(
        records[KNOWLEDGE], plan.codec, shape, lambda v: private_rows(v, clip_norm)
    )


def clip_upload_mod(clip_norm: float, num_classes: Callable[[], int]) -> Callable:
    """A Flower mod: `clip_reply` on the train reply before it leaves.
    `num_classes` is asked on the worker, where the client's data is loaded."""

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        plan = RoundPlan.from_record(msg.content.config_records[CONFIG])
        clip_reply(plan, reply.content, clip_norm, num_classes())
        return reply

    return mod
