"""Golden runs: run them, compare them with the recorded metrics, or re-record them.

    python -m tests.golden.record              # run all, compare with tests/golden/*.json
    python -m tests.golden.record --record     # re-record (a change that moves numbers on purpose)
    python -m tests.golden.record --dump DIR   # run all, write the fresh metrics to DIR

Each run keeps metrics.jsonl's rows and summary.json without timings or anything about
the host (TIMING_FIELDS, `SUMMARY_DROPPED`). `dsfl` runs on Flower's simulation engine
on Ray (`fedkd-sim` in a subprocess); the others call `run_rounds` with the client
function in this process (`DirectTransport`) as a cohort node calls it (faults, then the
client-DP clipping mod), with a Ray worker's torch threads (`simulation.num_cpus`):
bitwise the numbers of the same run on Ray (checked for each run when recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedkd.results.provenance import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

SMOKE = ("experiment=smoke", "output.plots=false", "output.checkpoint=false")
LIFELONG = (
    "rounds=4",
    "lifelong=class_incremental",
    "lifelong.num_tasks=2",
    "lifelong.rounds_per_task=2",
    "lifelong.proxy=drifting",
)
SEEDED_DP = ("strategy=dsfl", "privacy.secure_noise=false")
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {  # name: (path, fedkd-sim overrides)
    "dsfl": ("ray", (*SMOKE, "strategy=dsfl")),
    "fedavg": ("direct", (*SMOKE, "strategy=fedavg")),
    "lifelong_replay": ("direct", (*SMOKE, "strategy=dsfl", *LIFELONG, "mitigation=replay")),
    "dp_sample": ("direct", (*SMOKE, *SEEDED_DP, "privacy=sample")),
    # noise 1.0 over 3 clients leaves the teacher at chance: 0.05 lets it learn a little
    "dp_client": (
        "direct",
        (*SMOKE, *SEEDED_DP, "privacy=client", "privacy.noise_multiplier=0.05"),
    ),
}
# --record also keeps this run with a learning rate 1e-3 (relative) higher: the check must
# see it (tests/test_golden.py)
PERTURBED_RUN, PERTURBATION = "dsfl", "train.lr=0.01001"
# summary.json keys that describe the run's machinery or host, not its numbers
SUMMARY_DROPPED = ("nodes", "nodes_admitted", "ray_nodes", "execution", "provenance")

# Tolerances: 5x and 30x what `--spread` measured (tests/golden/spread.json: at most 1 test
# item, 3.0e-5 relative), far below what a learning rate 1e-3 higher moves (27 items, 1.5e-2)
ABS_ITEMS = 5  # accuracies and their differences: this many test items of the smallest set
REL = 1e-3  # every other float (losses, entropies, epsilons), relative
ACCURACY_WORDS = ("accuracy", "forgetting", "bwt", "fwt")
EXACT_WORDS = ("bytes",)  # floats that must match exactly (bytes per round)


def timing_fields() -> tuple[str, ...]:
    from fedkd.results import TIMING_FIELDS

    return TIMING_FIELDS


def strip(rows: list[dict], summary: dict) -> dict[str, Any]:
    timing = set(timing_fields())
    rows = [{k: v for k, v in r.items() if k not in timing} for r in rows]
    drop = timing | set(SUMMARY_DROPPED)
    return {"rows": rows, "summary": {k: v for k, v in summary.items() if k not in drop}}


def compose(overrides: tuple[str, ...]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedkd.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def run_ray(overrides: tuple[str, ...], out: Path) -> None:
    """`fedkd-sim` on Flower's simulation engine (Ray), as a user runs it."""
    cmd = [sys.executable, "-m", "simulations.run", *overrides, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def run_direct(overrides: tuple[str, ...], out: Path) -> None:
    """The round loop with the client function called in this process."""
    import torch

    from fedkd.client import serve_client
    from fedkd.privacy.upload import clip_reply
    from fedkd.protocol import CONFIG, RoundPlan
    from fedkd.results import RunRecorder
    from fedkd.round_loop import DirectTransport, run_rounds
    from fedkd.server_state import build_server_state
    from fedkd.simulation import prepare

    plain = prepare(compose(overrides), out)
    state = build_server_state(plain, "cpu")
    state.population = list(range(state.cfg.num_clients))
    state.privacy.set_population(len(state.population))
    client_threads = int(plain["simulation"]["num_cpus"])

    privacy = state.cfg.privacy
    classes = state.data.num_classes

    def client(pid, content):  # what fedkd/client.py's cohort train handler does
        server_threads = torch.get_num_threads()
        torch.set_num_threads(client_threads)  # as a Ray worker (fedkd/client_runtime.py)
        try:
            reply = serve_client(plain, pid, content)
            if privacy.mode == "client":  # the clipping mod
                plan = RoundPlan.from_record(content.config_records[CONFIG])
                clip_reply(plan, reply, privacy.clip_norm, classes)
            return reply
        finally:
            torch.set_num_threads(server_threads)

    from fedkd.server import run_meta

    meta = run_meta(state, [], {})  # its node counts are dropped (SUMMARY_DROPPED)
    recorder = RunRecorder(out, meta, progress=None, plots=False)
    recorder.finish(run_rounds(state, DirectTransport(client), recorder))


def run(name: str, work: Path, extra: tuple[str, ...] = (), path: str | None = None) -> dict:
    """Run `name` (with `extra` overrides, on `path` instead of its own) in `work`;
    its metrics without timings."""
    from fedkd.results import read_metrics

    own, overrides = RUNS[name]
    out = work / "-".join((name, path or own, *extra)).replace("=", "_")
    (run_ray if (path or own) == "ray" else run_direct)((*overrides, *extra), out)
    summary = json.loads((out / "summary.json").read_text())
    return strip(read_metrics(out), summary)


def provenance() -> dict[str, Any]:
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "fedkd", "strategies", "simulations", "conf"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------ comparison
def test_items(golden: dict[str, Any]) -> int:
    """The smallest test set any accuracy of the run is scored on (one task's share)."""
    return int(golden["test_items"])


def is_accuracy(key: str) -> bool:
    return any(w in key for w in ACCURACY_WORDS)


def differences(golden: dict[str, Any], fresh: dict[str, Any], items: int) -> list[str]:
    """Where `fresh` departs from `golden` beyond the tolerances: accuracies (and
    forgetting, bwt, fwt) by more than ABS_ITEMS / items, other floats by more than
    REL relative; everything else (bytes, counts, names) exactly."""
    out: list[str] = []

    def walk(g: Any, f: Any, where: str, key: str) -> None:
        if isinstance(g, dict) and isinstance(f, dict):
            for k in sorted(set(g) | set(f)):
                if k not in g or k not in f:
                    out.append(f"{where}.{k}: only in {'golden' if k in g else 'this run'}")
                else:
                    walk(g[k], f[k], f"{where}.{k}", k)
        elif isinstance(g, list) and isinstance(f, list) and len(g) == len(f):
            for i, (a, b) in enumerate(zip(g, f, strict=True)):
                walk(a, b, f"{where}[{i}]", key)
        elif isinstance(g, float) and isinstance(f, int | float) and not isinstance(f, bool):
            if math.isnan(g) or math.isnan(f):
                ok = math.isnan(g) and math.isnan(f)
            elif any(w in key for w in EXACT_WORDS):
                ok = f == g
            elif is_accuracy(key):
                ok = abs(f - g) <= ABS_ITEMS / items + 1e-9
            else:
                ok = abs(f - g) <= REL * max(abs(g), 1e-12)
            if not ok:
                out.append(f"{where}: golden {g!r}, now {f!r} (diff {f - g:+.3g})")
        elif g != f:
            out.append(f"{where}: golden {g!r}, now {f!r}")

    walk(golden["metrics"], fresh, golden["name"], "")
    return out


def max_deviation(a: dict[str, Any], b: dict[str, Any], items: int) -> dict[str, float]:
    """The largest difference between two runs' metrics: accuracies in test items
    (absolute difference x items), other floats relative; and exact-field mismatches."""
    worst = {"accuracy_items": 0.0, "relative": 0.0, "exact_mismatches": 0}

    def walk(x: Any, y: Any, key: str) -> None:
        if isinstance(x, dict):
            for k in x:
                if k in y:
                    walk(x[k], y[k], k)
        elif isinstance(x, list):
            for u, v in zip(x, y, strict=False):
                walk(u, v, key)
        elif isinstance(x, float) and isinstance(y, float):
            if is_accuracy(key):
                worst["accuracy_items"] = max(worst["accuracy_items"], abs(x - y) * items)
            else:
                rel = abs(x - y) / max(abs(x), 1e-12)
                worst["relative"] = max(worst["relative"], rel)
        elif x != y:
            worst["exact_mismatches"] += 1

    walk(a, b, "")
    return worst


def golden_path(name: str) -> Path:
    return HERE / f"{name}.json"


def load(name: str) -> dict[str, Any]:
    return json.loads(golden_path(name).read_text())


def smallest_test_set(name: str) -> int:
    """Test items behind the finest accuracy of a run: the teacher's test set, or one
    task's share of it (each client is scored on the same set, or a part of it)."""
    from fedkd.compose import to_plain
    from fedkd.data import federated_data

    data = federated_data(to_plain(compose(RUNS[name][1])))
    return min(len(y) for _, y in data.task_tests + data.client_task_tests)


# (ATEN_CPU_CAPABILITY, OMP_NUM_THREADS): the kernels torch may pick on another CPU, and
# the server's threads on a machine with 1, 2 or 4 cores
SETTINGS = (
    ("avx512", 1),
    ("avx512", 2),
    ("avx512", 4),
    ("avx2", 1),
    ("avx2", 2),
    ("default", 1),
    ("default", 2),
)


def spread(runs: list[str], work: Path) -> dict[str, Any]:
    """Every run again under each torch CPU kernel (ATEN_CPU_CAPABILITY) and server
    thread count (OMP_NUM_THREADS; a Ray worker keeps simulation.num_cpus), each in a
    fresh process; the largest departure of each from its golden metrics."""
    import os

    out: dict[str, Any] = {**provenance(), "settings": {}, "worst": {}}
    for cap, threads in SETTINGS:
        setting = f"{cap}/{threads}"
        dump = work / setting.replace("/", "-")
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "tests.golden.record", "--dump", str(dump), *runs]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        got = {}
        for name in runs:
            golden = load(name)
            fresh = json.loads((dump / f"{name}.json").read_text())
            got[name] = max_deviation(golden["metrics"], fresh, golden["test_items"])
            worst = out["worst"].setdefault(name, dict.fromkeys(got[name], 0))
            for k, v in got[name].items():
                worst[k] = max(worst[k], v)
        out["settings"][setting] = got
        print(setting, json.dumps(got), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden.record", description=__doc__)
    parser.add_argument("--record", action="store_true", help="write tests/golden/<run>.json")
    parser.add_argument("--why", default="", help="with --record: why the numbers moved")
    parser.add_argument("--dump", type=Path, help="write the fresh metrics to this folder")
    parser.add_argument(
        "--spread", action="store_true", help="measure the runs across CPU kernels and threads"
    )
    parser.add_argument("runs", nargs="*", default=list(RUNS), help=f"of {', '.join(RUNS)}")
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory(prefix="fedkd-golden-") as tmp:
        if args.spread:
            result = spread(args.runs, Path(tmp))
            (HERE / "spread.json").write_text(json.dumps(result, indent=1) + "\n")
            return 0
        for name in args.runs:
            fresh = run(name, Path(tmp))
            if args.dump:
                args.dump.mkdir(parents=True, exist_ok=True)
                (args.dump / f"{name}.json").write_text(json.dumps(fresh, indent=1) + "\n")
            if args.record:
                path, overrides = RUNS[name]
                if path != "ray" and run(name, Path(tmp), path="ray") != fresh:
                    raise SystemExit(f"{name}: this process and Ray give different numbers")
                record = {
                    "name": name,
                    "path": path,
                    "overrides": list(overrides),
                    **provenance(),
                    "why": args.why,
                    "test_items": smallest_test_set(name),
                    "metrics": fresh,
                }
                if name == PERTURBED_RUN:
                    moved = run(name, Path(tmp), (PERTURBATION,), path="direct")
                    record["perturbed"] = {"overrides": [PERTURBATION], "metrics": moved}
                golden_path(name).write_text(json.dumps(record, indent=1) + "\n")
                print(f"{name}: recorded {golden_path(name)}")
            elif golden_path(name).exists() and not args.dump:
                golden = load(name)
                diffs = differences(golden, fresh, test_items(golden))
                failed |= bool(diffs)
                print(f"{name}: " + ("matches" if not diffs else "DIFFERS"))
                for d in diffs:
                    print("  " + d)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
