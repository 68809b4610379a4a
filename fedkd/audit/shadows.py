"""Shadow clients: LiRA's reference distributions and the black-box one-run bound.

K shadows train as the target client trains (fedkd/audit/client.py: its local
recipe, the teacher's soft labels, FedAvg's global model, DP-SGD), each on the
shard's other examples plus, by fair coins, the candidates (LiRA's in and out) and
c input canaries: black images with a few white pixels and a random label, far from
every real image, so that one trained on stands out in the server's view.

The black-box bound. The shadows split in two: the first half are references, whose
canary bits the auditor knows; the second half are tested. A tested shadow's score
for a canary is its logit-scaled confidence less that canary's mean in the
references where it was out (difficulty calibration). The references were drawn
independently of the tested shadows' bits, so a guess from that score is a guess
from the output plus side information that carries no bit, which is all the one-run
test (Steinke, Nasr and Jagielski 2023) asks. The tested shadows together are one
mechanism whose output is all their models; each canary enters one of them, so its
bit is as private as in that shadow (the largest accountant epsilon among them
bounds all), and every tested shadow's guesses enter one test, with no Bonferroni
correction. Guesses: "in" for the `guesses` highest scores of each tested shadow,
"out" for as many lowest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedkd.audit.metrics import one_run_epsilon, one_run_guesses
from fedkd.data.federated import FederatedData
from fedkd.seeding import numpy_rng, torch_generator

if TYPE_CHECKING:
    from fedkd.audit.client import ClientRecipe
    from fedkd.audit.run import Candidates, ServerView

WHITE_PIXELS = 20  # per input canary


@dataclass
class Shadows:
    phi: np.ndarray  # (K, m) the candidates' scores in each shadow's server view
    included: np.ndarray  # (K, m) bool: candidate in that shadow's data
    canary_phi: np.ndarray  # (K, c)
    canary_in: np.ndarray  # (K, c) bool
    epsilon: list[float | None]  # the accountant's, per shadow (None: no DP)


def input_canaries(data: FederatedData, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` black images with WHITE_PIXELS white pixels each (every channel) and a
    random label, normalised as the run's data: no real image looks like them."""
    rng = numpy_rng(seed, "audit-input-canaries")
    c, h, w = data.input_shape
    raw = np.zeros((count, c, h * w), dtype=np.uint8)
    for i in range(count):
        raw[i, :, rng.choice(h * w, min(WHITE_PIXELS, h * w), replace=False)] = 255
    labels = rng.integers(0, data.num_classes, count)
    return data.normalize(raw.reshape(count, c, h, w)), torch.from_numpy(labels).long()


def train_shadows(
    view: ServerView,
    recipe: ClientRecipe,
    cand: Candidates,
    canaries: tuple[torch.Tensor, torch.Tensor],
    count: int,
    seed: int,
) -> Shadows:
    """`count` shadows, each trained by `recipe` and seen as the server sees it."""
    from fedkd.local_round import new_student

    cx, cy = canaries
    included = numpy_rng(seed, "audit-shadow-in").random((count, cand.m)) < 0.5
    canary_in = numpy_rng(seed, "audit-canary-in").random((count, len(cy))) < 0.5
    phi, canary_phi, epsilon = [], [], []
    for k in range(count):
        keep, kc = torch.from_numpy(included[k]), torch.from_numpy(canary_in[k])
        x = torch.cat([cand.rest_x, cand.x[keep], cx[kc]])
        y = torch.cat([cand.rest_y.long(), cand.y[keep], cy[kc]])
        model = new_student(view.cfg, view.data, view.pid)  # the target's (public) init
        recipe.train(model, x, y, torch_generator(seed, "audit-shadow", k))
        seen = view.server_model(model, f"shadow-{k}")
        phi.append(view.phi(seen, cand.x, cand.y))
        canary_phi.append(view.phi(seen, cx, cy))
        epsilon.append(view.shadow_epsilon(recipe, len(y)))
    return Shadows(np.stack(phi), included, np.stack(canary_phi), canary_in, epsilon)


def calibrated(reference: np.ndarray, reference_in: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """`scores` (T, c) less each canary's mean over the references where it was out
    (over all references where it was in every one of them)."""
    out = ~reference_in
    counts = out.sum(0)
    sums = np.where(out, reference, 0.0).sum(0)
    baseline = np.where(counts > 0, sums / np.maximum(counts, 1), reference.mean(0))
    return scores - baseline[None, :]


def one_run_bound(
    shadows: Shadows, guesses: int, delta: float, confidence: float = 0.95
) -> dict[str, Any]:
    """The black-box one-run bound over the tested shadows (module docstring)."""
    k, c = shadows.canary_in.shape
    refs = k // 2
    scores = calibrated(
        shadows.canary_phi[:refs], shadows.canary_in[:refs], shadows.canary_phi[refs:]
    )
    per_shadow, r, v = [], 0, 0
    for t in range(refs, k):
        rt, vt = one_run_guesses(shadows.canary_in[t], scores[t - refs], guesses)
        r, v = r + rt, v + vt
        per_shadow.append({"guesses": rt, "correct": vt, "accountant_epsilon": shadows.epsilon[t]})
    tested = shadows.epsilon[refs:]
    p, m = 1 - confidence, c * (k - refs)
    return {
        "audit": "black-box, input canaries in shadow clients, the server's view",
        "value": one_run_epsilon(m, r, v, delta, p),
        "attainable": one_run_epsilon(m, r, r, delta, p),
        "confidence": confidence,
        "canaries": m,
        "guesses": r,
        "correct": v,
        "reference_shadows": refs,
        "tested_shadows": k - refs,
        "accountant_epsilon": None if tested[0] is None else max(tested),
        "shadows": per_shadow,
    }
