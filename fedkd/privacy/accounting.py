"""Privacy accounting with dp-accounting (Google's RDP accountant)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from functools import lru_cache


class _ExcludedOrderFilter(logging.Filter):
    """Drops dp-accounting's note that a fractional RDP order did not converge.

    The accountant then leaves that order out of the minimum it takes over orders,
    so the epsilon is still an upper bound (at worst a looser one); with client
    sampling at q = 0.1 and sigma < 1 the note came six times a round.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


logging.getLogger("absl").addFilter(_ExcludedOrderFilter())


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


def composed_epsilon(events: Iterable[tuple[float, float, int]], delta: float) -> float:
    """epsilon at `delta` after Poisson-subsampled Gaussian mechanisms of differing
    noise: `events` lists (sample_rate, noise_multiplier, steps), composed in RDP (a
    device's ledger spans runs with different settings). Zero noise: inf."""
    key = tuple(
        sorted((round(float(q), 12), float(s), int(n)) for q, s, n in events if n > 0 and q > 0)
    )
    return _composed(key, float(delta))


@lru_cache(maxsize=256)
def _composed(events: tuple[tuple[float, float, int], ...], delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if not events:
        return 0.0
    if any(sigma <= 0 for _, sigma, _ in events):
        return math.inf
    accountant = RdpAccountant()
    for q, sigma, steps in events:
        event = dp_accounting.PoissonSampledDpEvent(
            min(1.0, q), dp_accounting.GaussianDpEvent(sigma)
        )
        accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))
