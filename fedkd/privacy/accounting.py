"""Privacy accounting with dp-accounting (Google's RDP accountant)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache


def gaussian_epsilon(
    noise_multiplier: float, events: Iterable[tuple[float, int]], delta: float
) -> float:
    """epsilon at `delta` after Poisson-subsampled Gaussian mechanisms.

    `events` lists (sample_rate, steps): `steps` mechanisms in which a given unit (an
    example, or a client) takes part with probability `sample_rate`. The noise
    multiplier is the noise std over the L2 sensitivity. Nothing composed spends
    nothing; zero noise is not private (inf).
    """
    key = tuple(sorted((round(float(q), 12), int(n)) for q, n in events if n > 0 and q > 0))
    return _epsilon(float(noise_multiplier), key, float(delta))


@lru_cache(maxsize=4096)
def _epsilon(noise_multiplier: float, events: tuple[tuple[float, int], ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if not events:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RdpAccountant()
    for q, steps in events:
        event = dp_accounting.PoissonSampledDpEvent(
            min(1.0, q), dp_accounting.GaussianDpEvent(noise_multiplier)
        )
        accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))
