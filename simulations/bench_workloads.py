"""`fedkd-bench`'s name and its built-in workloads, shared by the runner
(simulations/bench.py) and the summary (simulations/bench_summary.py), which lists
the many-clients rows in this order."""

from __future__ import annotations

PROG = "fedkd-bench"

# The many-clients workloads (issue: a round's cost should follow its images, not its
# clients): FedAvg on 48,000 private IID images per round, next to no evaluation.
FEDAVG_IMAGES = [
    "strategy=fedavg",
    "partition=iid",
    "proxy.size=12000",
    "train.lr=0.05",
    "eval.client_test_size=1",
    "eval.teacher_test_size=1000",
    "rounds=3",
]
CLIENT_WORKLOADS = [
    ("clients-fedavg-n10", [*FEDAVG_IMAGES, "num_clients=10", "clients_per_round=10"]),
    ("clients-fedavg-n100", [*FEDAVG_IMAGES, "num_clients=100", "clients_per_round=100"]),
    ("clients-fedavg-n1000", [*FEDAVG_IMAGES, "num_clients=1000", "clients_per_round=1000"]),
    (
        "clients-fedavg-n10000-cpr1000",
        [*FEDAVG_IMAGES, "num_clients=10000", "clients_per_round=1000"],
    ),
    (
        "clients-dsfl-n1000",
        ["experiment=bench", "num_clients=1000", "clients_per_round=1000", "rounds=2"],
    ),
]
