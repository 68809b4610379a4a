"""What every fedkd command does with a user error: one line on stderr, exit code 2.

Hydra's composition errors are multi-line; they are condensed to one line naming the
key, the value and what is allowed. Bugs (any other exception) keep their traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedkd.compose import describe_hydra_error
from fedkd.errors import FedKDError

EXIT_USAGE = 2


def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException)


def fail(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(EXIT_USAGE)


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn user errors raised inside the block into one line and exit code 2."""
    try:
        yield
    except FedKDError as exc:
        fail(prog, str(exc))
    except _user_error_types() as exc:
        fail(prog, describe_hydra_error(exc))


def run_cli(prog: str, fn: Callable[[], object]) -> None:
    with user_errors(prog):
        fn()
