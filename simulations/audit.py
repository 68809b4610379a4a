"""`fedkd-audit RUN_DIR`: membership inference against one client of a finished run.

    fedkd-audit outputs/2026-12-06/10-00-00_dsfl --client 0 --shadows 4 --out audit.json

The attacker is the honest-but-curious server with exactly what fedkd sent it (the
client's weights, or its coded soft labels on the proxy set). Prints each attack's
ROC AUC and TPR at 1% and 0.1% FPR with 95% bootstrap intervals, and writes them as
JSON. The run must have kept its client state (simulation.keep_client_state=true,
the default). How to read the numbers: README, "Privacy".
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
    from fedkd.errors import ConfigError
    from fedkd.results.recorder import write_json_atomic

    for key, low in (("candidates", 10), ("shadows", 2), ("surrogate_epochs", 1)):
        if getattr(args, key) < low:
            raise ConfigError(f"--{key.replace('_', '-')}", getattr(args, key), f">= {low}")
    settings = AuditSettings(
        client=args.client,
        candidates=args.candidates,
        shadows=args.shadows,
        seed=args.seed,
        shadow_epochs=args.shadow_epochs,
        surrogate_epochs=args.surrogate_epochs,
    )
    result = audit_run(Path(args.run_dir), settings)
    table = Table(title=f"{result['strategy']}, server sees {result['view']}, client {args.client}")
    for col in ("attack", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR"):
        table.add_column(col)
    for name, a in result["attacks"].items():
        cells = [
            f"{a[k]:.3f} [{a[k + '_ci'][0]:.3f}, {a[k + '_ci'][1]:.3f}]"
            for k in ("auc", "tpr_at_0.01_fpr", "tpr_at_0.001_fpr")
        ]
        table.add_row(name, *cells)
    Console().print(table)
    bound = result["epsilon_lower_bound"]
    accounted = [s["accountant_epsilon"] for s in bound["shadows"]]
    print(
        f"empirical epsilon lower bound ({bound['confidence']:.0%}, one-run audit of "
        f"{len(accounted)} shadows, {bound['canaries']} canaries): {bound['value']:.2f}; "
        f"accountant: {'no DP' if accounted[0] is None else f'{max(accounted):.2f}'}"
    )
    out = Path(args.out or Path(args.run_dir) / "audit.json")
    write_json_atomic(out, result)
    print(
        f"{result['members']} members, {result['non_members']} non-members, "
        f"{args.shadows} shadows, {result['seconds']:.0f} s; written to {out}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--client", type=int, default=0, help="target partition (default 0)")
    parser.add_argument("--candidates", type=int, default=500, help="members (as many non-members)")
    parser.add_argument("--shadows", type=int, default=4, help="shadow clients for LiRA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shadow-epochs",
        type=int,
        default=None,
        help="default: rounds x train.epochs, as the target trained",
    )
    parser.add_argument("--surrogate-epochs", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file (default RUN_DIR/audit.json)")
    args = parser.parse_args(argv)
    run_cli(PROG, lambda: audit(args))


if __name__ == "__main__":
    main()
