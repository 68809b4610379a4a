"""The server's privacy layer: the round loop calls it, no strategy needs to.

It owns every server-side step of a DP mechanism, so a strategy that knows nothing
about privacy is still served only what the accountant covers:

- **who trains** (`sample_clients`): under `privacy.mode=client` the cohort is a
  Poisson sample, each admitted client independently with probability
  q = clients_per_round / admitted, the sampling that the accountant's
  amplification assumes (DP-FedAvg, McMahan et al. 2018). With `secure_noise` it
  comes from the OS CSPRNG, so nobody who knows the seed knows the cohort; with
  `secure_noise=false` from the seed (replayable, labelled `client_sampling`).
  Other modes keep the strategy's own sampling, a pure function of (seed, round).
- **what a strategy aggregates** (`release`): under `privacy.mode=client` the
  valid uploads are centred, clipped, summed, noised and divided by the expected
  cohort q * admitted (fedkd/privacy/upload.py); the strategy gets that one noisy
  mean as a single reply, re-coded in its own upload codec (post-processing).
- **what was spent** (`count_round`, `stats`): every sampled client counts as
  having trained, whatever became of its reply. Client level: the accountant's
  epsilon for the Poisson-subsampled Gaussian over every round played, and beside
  it the worst client's epsilon *without* amplification, from its actual
  participations (for a threat model that gives the adversary the cohort). Sample
  level: each client's DP-SGD steps as the server can count them (its plan and its
  declared shard size) or as it reported them, whichever is larger.

It also records where the noise came from (`dp_noise`: the OS CSPRNG, or a seeded
stream; for DP-SGD as the clients report it) and what clients withheld.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import RecordDict

from fedkd.comm.codecs import decode, encode
from fedkd.privacy.accounting import gaussian_epsilon
from fedkd.privacy.dpsgd import DPSGD, dp_steps_per_round
from fedkd.privacy.noise import SECURE, SEEDED, DPNoise, os_uniform
from fedkd.privacy.release import withheld
from fedkd.privacy.upload import noisy_mean
from fedkd.protocol import KNOWLEDGE, LOGITS, ClientReply
from fedkd.seeding import numpy_rng, torch_generator

if TYPE_CHECKING:
    from collections.abc import Callable

    from fedkd.config import FedKDConfig
    from fedkd.round import Round

AGGREGATE = -1  # the partition id of the noised aggregate a strategy receives
POISSON_SECRET = "poisson, os-csprng"
POISSON_SEEDED = "poisson, seeded (replayable: no amplification against whoever knows the seed)"
FIXED_SEEDED = "fixed-size, seeded (no amplification claimed)"


class PrivacyLedger:
    def __init__(self, cfg: FedKDConfig) -> None:
        self.privacy = cfg.privacy
        self.seed = cfg.seed
        self.clients_per_round = cfg.clients_per_round
        self.population = cfg.num_clients
        self.rounds = 0  # rounds played (client level: each may release a noised sum)
        self.participations: Counter[int] = Counter()  # sampled rounds per client
        self.dp_events: dict[int, Counter[float]] = {}  # sample: {q: steps} per client
        self.client_epsilon: dict[int, float] = {}  # sample: as clients report it
        self.client_noise: dict[int, str] = {}  # sample: each client's noise, as reported

    def set_population(self, admitted: int) -> None:
        """Sample over the partitions that passed the handshake, not the configured
        num_clients: fewer admitted means each is sampled more often."""
        if admitted > 0:
            self.population = admitted

    @property
    def sample_rate(self) -> float:
        """q: the chance that a given client trains in a given round."""
        return min(self.clients_per_round, self.population) / self.population

    @property
    def client_level(self) -> bool:
        return self.privacy.mode == "client"

    @property
    def sampling(self) -> str:
        if not self.client_level:
            return FIXED_SEEDED
        return POISSON_SECRET if self.privacy.secure_noise else POISSON_SEEDED

    # ------------------------------------------------------------ the round's steps
    def sample_clients(
        self, rnd: int, population: list[int], default: Callable[[int, list[int]], list[int]]
    ) -> list[int]:
        """The round's cohort, sorted: Poisson under client-level DP, else `default`."""
        if not self.client_level:
            return default(rnd, population)
        pool = sorted(population)
        q = self.sample_rate
        if self.privacy.secure_noise:
            coins = os_uniform(len(pool)) <= q
        else:
            coins = numpy_rng(self.seed, rnd, "client-sampling-poisson").random(len(pool)) < q
        return [pid for pid, chosen in zip(pool, coins, strict=True) if chosen]

    def count_round(self, r: Round, declared: dict[int, int]) -> None:
        """Every sampled client trained (or may have): count it, before any reply."""
        self.rounds += 1
        self.participations.update(r.sampled)
        if self.privacy.mode != "sample":
            return
        for pid in r.sampled:
            n = declared.get(pid)
            if n is None:  # no size known: only the client's own report counts it
                continue
            dp = DPSGD.from_config(self.privacy, r.plans[pid].training)
            q, steps = dp_steps_per_round(n, dp.batch_size, dp.epochs)
            self.dp_events.setdefault(pid, Counter())[q] += steps

    def release(self, r: Round, valid: list[ClientReply], check_payload: Callable) -> list:
        """What the strategy may aggregate: the valid replies, or under client-level
        DP one reply holding their noised mean (partition id AGGREGATE)."""
        if not self.client_level or not valid:
            return valid
        pv = self.privacy
        shape = r.knowledge_shape
        codec = r.plans[valid[0].partition_id].codec
        uploads = torch.stack([decode(c.upload, LOGITS, codec, shape) for c in valid])
        seeded = None if pv.secure_noise else torch_generator(self.seed, r.number, "dp-noise")
        expected = self.sample_rate * self.population
        mean = noisy_mean(uploads, pv.clip_norm, pv.noise_multiplier, DPNoise(seeded), expected)
        content = RecordDict({KNOWLEDGE: encode(mean, codec, LOGITS, kind="logits")})
        merged = ClientReply(AGGREGATE, 1, {}, None, 0, upload=content.array_records[KNOWLEDGE])
        return [replace(merged, arrays=check_payload(r, content))]

    def record_reply(self, partition_id: int, metrics: dict[str, Any]) -> None:
        """Keep what a valid reply says about its client's own DP-SGD spending."""
        if "dp-epsilon" in metrics:
            self.client_epsilon[partition_id] = float(metrics["dp-epsilon"])
        if "dp-secure-noise" in metrics:
            secure = bool(metrics["dp-secure-noise"])
            self.client_noise[partition_id] = SECURE if secure else SEEDED

    # ------------------------------------------------------------------- reports
    def client_spent(self, pid: int) -> float:
        """Sample level: a client's epsilon as the server counts its DP-SGD steps."""
        events = [(q, n) for q, n in self.dp_events.get(pid, {}).items()]
        return gaussian_epsilon(self.privacy.noise_multiplier, events, self.privacy.delta)

    def stats(self) -> dict[str, Any]:
        """The privacy spent so far, at delta: for the worst-off client's data
        (sample), or for any client's participation (client)."""
        pv = self.privacy
        if pv.mode == "none":
            return {}
        out: dict[str, Any] = {"delta": pv.delta, "noise_multiplier": pv.noise_multiplier}
        if pv.mode == "sample":
            trained = set(self.dp_events) | set(self.client_epsilon)
            out["epsilon"] = max(
                (max(self.client_spent(p), self.client_epsilon.get(p, 0.0)) for p in trained),
                default=0.0,
            )
        else:
            sigma = pv.noise_multiplier
            out["epsilon"] = gaussian_epsilon(sigma, [(self.sample_rate, self.rounds)], pv.delta)
            most = max(self.participations.values(), default=0)
            out["epsilon_unamplified"] = gaussian_epsilon(sigma, [(1.0, most)], pv.delta)
            out["max_participations"] = most
        out["client_sampling"] = self.sampling
        out["dp_noise"] = self.noise_kind()
        return out

    def noise_kind(self) -> str:
        """Where the noise came from: the server's own (client), or what every client
        reported (sample; "mixed" when they differ, as when devices insist on secret
        noise under a config that asked for seeded noise)."""
        if self.privacy.mode == "sample" and self.client_noise:
            kinds = set(self.client_noise.values())
            return kinds.pop() if len(kinds) == 1 else "mixed"
        return SECURE if self.privacy.secure_noise else SEEDED

    def summary(self) -> dict[str, Any]:
        """For summary.json: the noise's source, the sampling, and what clients withheld."""
        if self.privacy.mode == "none":
            return {}
        return {
            "dp_noise": self.noise_kind(),
            "client_sampling": self.sampling,
            "dp_withheld": withheld(self.privacy.mode),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "client_epsilon": dict(self.client_epsilon),
            "rounds": self.rounds,
            "participations": dict(self.participations),
            "dp_events": {p: dict(e) for p, e in self.dp_events.items()},
            "client_noise": dict(self.client_noise),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.client_epsilon = {int(k): float(v) for k, v in state["client_epsilon"].items()}
        # "noised_rounds": checkpoints from before the privacy layer counted rounds so
        self.rounds = int(state.get("rounds", state.get("noised_rounds", 0)))
        self.participations = Counter(
            {int(k): int(v) for k, v in state.get("participations", {}).items()}
        )
        self.dp_events = {
            int(p): Counter({float(q): int(n) for q, n in e.items()})
            for p, e in state.get("dp_events", {}).items()
        }
        noise = state.get("client_noise", {})  # absent in checkpoints before secure noise
        self.client_noise = {int(k): v for k, v in noise.items() if v in (SECURE, SEEDED)}
