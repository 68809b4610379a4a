"""Where DP noise comes from: the OS CSPRNG (secret) or a seeded stream (replayable).

Differential privacy holds only while nobody can predict the noise. Every other
random stream in fedkd is derived from (seed, round, partition, tag) so runs repeat
exactly; the noise that protects data must not be, since whoever knows the config
(in deployment, every participant) could regenerate it and subtract it.

`privacy.secure_noise=true` (the default) draws DP-SGD's Gaussian noise and its
Poisson sample, and the server's client-level noise, from `os.urandom` on the party
that adds it. Normals come from uniform 53-bit floats by Box-Muller in float64, and,
as Opacus' `secure_mode` does, each value is the mean of four draws scaled back to
the same std, which defeats the floating-point attacks on textbook Gaussian
samplers (Holohan and Braghin 2021, arXiv:2107.10138). `secure_noise=false` keeps the
seeded stream for studies that must replay a run; the run records which was used
(`dp_noise` in metrics.jsonl and summary.json).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

SECURE = "os-csprng"
SEEDED = "seeded"
_DRAWS = 4  # normals averaged per value (Opacus' secure_mode uses 2n with n = 2)


def os_uniform(n: int) -> np.ndarray:
    """n floats uniform in (0, 1], from the OS CSPRNG (53 random bits each)."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def os_normal(n: int) -> np.ndarray:
    """n standard normals from the OS CSPRNG (Box-Muller, float64)."""
    half = (n + 1) // 2
    u1, u2 = os_uniform(half), os_uniform(half)
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])
    return z[:n]


class DPNoise:
    """The noise source of one party's DP mechanism.

    `generator=None`: secret noise from the OS CSPRNG. A generator: the seeded,
    replayable stream, drawn exactly as torch would draw it (so studies that ask for
    reproducible noise give the same numbers as before this class existed).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @property
    def secure(self) -> bool:
        return self.generator is None

    @property
    def kind(self) -> str:
        return SECURE if self.secure else SEEDED

    def normal(self, shape: torch.Size | tuple[int, ...], std: float) -> torch.Tensor:
        """N(0, std^2) noise of `shape` (float32)."""
        if not self.secure:
            return std * torch.randn(shape, generator=self.generator)
        n = math.prod(shape)
        draws = os_normal(_DRAWS * n).reshape(_DRAWS, n).sum(0) / math.sqrt(_DRAWS)
        return torch.from_numpy(std * draws).float().reshape(shape)

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """n independent coin flips with probability p (a Poisson sample's mask)."""
        if not self.secure:
            return torch.rand(n, generator=self.generator) < p
        return torch.from_numpy(os_uniform(n) <= p)
