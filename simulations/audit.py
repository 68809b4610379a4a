"""`fedkd-audit RUN_DIR`: what one client of a finished run leaks, and an epsilon it disproves.

    fedkd-audit outputs/2026-12-06/10-00-00_dsfl --client 0 --out audit.json

The attacker is the honest-but-curious server with exactly what fedkd sent it (the
client's weights, or its coded soft labels on the proxy set). Prints each attack's
ROC AUC and TPR at 1% and 0.1% FPR with 95% bootstrap intervals, then every
epsilon lower bound beside its attainable maximum, its canary and guess counts and
the accountant's epsilon (under privacy=sample, the white-box DP-SGD audit first),
and writes it all as JSON. The run must have kept its client state
(simulation.keep_client_state=true, the default). docs/audit.md says how to read it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from simulations.cli import run_cli

PROG = "fedkd-audit"


def audit(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedkd.audit.run import AuditSettings, audit_run
    from fedkd.results.recorder import write_json_atomic

    check_args(args)
    settings = AuditSettings(
        client=args.client,
        candidates=args.candidates,
        shadows=args.shadows,
        canaries=args.canaries,
        guesses=args.guesses,
        dirac_canaries=args.dirac_canaries,
        dirac_guesses=args.dirac_guesses,
        black_box=not args.white_box_only,
        seed=args.seed,
        shadow_rounds=args.shadow_rounds,
        surrogate_epochs=args.surrogate_epochs,
    )
    result = one_thread(lambda: audit_run(Path(args.run_dir), settings))
    if "attacks" in result:
        title = f"{result['strategy']}, server sees {result['view']}, client {args.client}"
        table = Table(title=title)
        for col in ("attack", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR"):
            table.add_column(col)
        for name, a in result["attacks"].items():
            cells = [
                f"{a[k]:.3f} [{a[k + '_ci'][0]:.3f}, {a[k + '_ci'][1]:.3f}]"
                for k in ("auc", "tpr_at_0.01_fpr", "tpr_at_0.001_fpr")
            ]
            table.add_row(name, *cells)
        Console().print(table)
    for key in ("epsilon_lower_bound", "black_box_lower_bound"):
        if key in result:
            print(bound_line(result[key]))
    out = Path(args.out or Path(args.run_dir) / "audit.json")
    write_json_atomic(out, result)
    members = (
        f"{result['members']} members, {result['non_members']} non-members, "
        if ("members" in result)
        else ""
    )
    print(f"{members}{result['seconds']:.0f} s; written to {out}")


def one_thread(fn):
    """`fn()` with torch on one thread, as each simulated client trains (num_cpus 1):
    on a machine shared with other runs, two threads made a shadow 12x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def bound_line(b: dict) -> str:
    """One bound, its ceiling and the counts it rests on, beside the accountant's."""
    accountant = b["accountant_epsilon"]
    said = "no DP" if accountant is None else f"{accountant:.2f}"
    if "dp_steps" in b:
        said += f" for the same {b['dp_steps']} DP steps"
    return (
        f"epsilon >= {b['value']:.2f} ({b['audit']}, {b['confidence']:.0%}): "
        f"attainable {b['attainable']:.2f} with {b['canaries']} canaries, "
        f"{b['correct']} of {b['guesses']} guesses right; accountant: {said}"
    )


def check_args(args: argparse.Namespace) -> None:
    """Values the audit cannot run with: one line naming the option."""
    from fedkd.errors import ConfigError

    lows = {"candidates": 10, "shadows": 2, "surrogate_epochs": 1, "canaries": 2}
    lows |= {"guesses": 1, "dirac_canaries": 2, "dirac_guesses": 1, "shadow_rounds": 1}
    for key, low in lows.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise ConfigError(f"--{key.replace('_', '-')}", value, f">= {low}")
    for guesses, canaries in (("guesses", "canaries"), ("dirac_guesses", "dirac_canaries")):
        most = getattr(args, canaries) // 2
        if getattr(args, guesses) > most:
            allowed = f"at most half of --{canaries.replace('_', '-')} ({most})"
            raise ConfigError(f"--{guesses.replace('_', '-')}", getattr(args, guesses), allowed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--client", type=int, default=0, help="target partition (default 0)")
    parser.add_argument("--candidates", type=int, default=500, help="members (as many non-members)")
    parser.add_argument(
        "--shadows",
        type=int,
        default=None,
        help="shadow clients (default 64 where a shadow replays one round, FedAvg; else 8)",
    )
    parser.add_argument(
        "--canaries", type=int, default=500, help="input canaries per shadow (black-box bound)"
    )
    parser.add_argument(
        "--guesses", type=int, default=25, help="black-box: guesses a side per tested shadow"
    )
    parser.add_argument(
        "--dirac-canaries", type=int, default=5000, help="white-box gradient canaries"
    )
    parser.add_argument("--dirac-guesses", type=int, default=250, help="white-box: a side")
    parser.add_argument(
        "--white-box-only",
        action="store_true",
        help="privacy=sample: skip the shadows (attacks and black-box bound)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shadow-rounds",
        type=int,
        default=None,
        help="rounds a shadow replays (default: as the target trained)",
    )
    parser.add_argument("--surrogate-epochs", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file (default RUN_DIR/audit.json)")
    args = parser.parse_args(argv)
    run_cli(PROG, lambda: audit(args))


if __name__ == "__main__":
    main()
