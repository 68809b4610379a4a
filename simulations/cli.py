"""What every fedkd command does with a user error: one line on stderr, exit code 2.

Hydra's composition errors are multi-line; they are condensed to one line naming the
key, the value and what is allowed. Bugs (any other exception) keep their traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fedkd.errors import ConfigError, FedKDError

EXIT_USAGE = 2


def describe_hydra_error(exc: BaseException) -> str:
    from omegaconf.errors import OmegaConfBaseException

    from fedkd.config import group_options

    text = str(exc)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = group_options(group)
        if options:
            return str(ConfigError(group, value, "one of " + ", ".join(options)))
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
    key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None) or str(cause)
    first = next((ln.strip() for ln in str(msg).splitlines() if ln.strip()), type(exc).__name__)
    override = re.search(r"override '?([^'\s]+)'?", text)
    if key:
        return f"{key}: {first}"
    if override and "not in struct" in text:
        return f"{override.group(1)}: unknown config key (to add a new key, prefix it with '+')"
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "\t"))
    ]
    return "; ".join(lines[:2]) if lines else first


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
