"""Run BlazeFL's own DS-FL example (v1.1.0) on Fashion-MNIST, for the side-by-side
table in docs/strategies.md ("DS-FL against the reference").

The reference's server, clients, distillation, ERA and Dirichlet split are imported
from its example unchanged; this file only swaps its CIFAR-10/100 data for the
machine's Fashion-MNIST (5,000 open images split off the training set, all used
every round) and its 3-channel CNN for the same CNN on 1x28x28 inputs (44,426
parameters). fedkd's `experiment=blazefl_dsfl` is the same setting.

    pip download --no-deps blazefl==1.1.0 && unzip -q blazefl-1.1.0-*.whl -d PKG
    git clone https://github.com/kitsuyaazuma/blazefl && git -C blazefl checkout v1.1.0
    export PYTHONPATH=PKG:blazefl/examples/step-by-step-dsfl  # its `algorithm`, `dataset`
    OMP_NUM_THREADS=1 python simulations/blazefl_reference.py --seed 0 --out ref_seed0.json

The classes live at module level because the reference's trainer pickles them to its
spawned client processes. BlazeFL 1.1.0 declares Python >= 3.12 but imports and runs
on 3.11. Writes one JSON object: the settings and the server's accuracy on the 10k
test images per round.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from algorithm import DSFLParallelClientTrainer, DSFLServerHandler
from blazefl.core import ModelSelector
from blazefl.utils import FilteredDataset, seed_everything
from dataset import DSFLPartitionedDataset
from dataset.functional import balance_split, client_inner_dirichlet_partition_faster
from torch import nn
from torch.nn import functional as F
from torchvision import transforms

FMNIST = Path("/usr/share/datasets/fashion-mnist")
SETTING = {
    "num_clients": 10,
    "dir_alpha": 0.5,
    "open_size": 5000,
    "open_size_per_round": 5000,
    "global_round": 20,
    "epochs": 5,
    "batch_size": 50,
    "lr": 0.1,
    "kd_epochs": 5,
    "kd_batch_size": 50,
    "kd_lr": 0.1,
    "era_temperature": 0.1,
}


def read_idx(name: str) -> np.ndarray:
    with gzip.open(FMNIST / name) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


class CNN(nn.Module):
    """The example's CNN (models/cnn.py) on one 28x28 channel: 16*4*4 features."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Selector(ModelSelector):
    def select_model(self, model_name: str) -> nn.Module:
        return CNN(num_classes=10)


class FashionMNIST(DSFLPartitionedDataset):
    """The example's dataset with its `_preprocess` on Fashion-MNIST."""

    def _preprocess(self) -> None:
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        x, y = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
        tx, ty = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
        open_idx = np.random.choice(len(y), size=self.open_size, replace=False)
        rest = np.setdiff1d(np.arange(len(y)), open_idx)
        x_open, x, y = x[open_idx], x[rest], y[rest].tolist()
        for part in ("train", "open", "test"):
            self.path.joinpath(part).mkdir(parents=True)
        split = {
            "num_clients": self.num_clients,
            "num_classes": 10,
            "dir_alpha": self.dir_alpha,
            "verbose": False,
        }
        clients, priors = client_inner_dirichlet_partition_faster(
            targets=y, client_sample_nums=balance_split(self.num_clients, len(y)), **split
        )
        test_clients, _ = client_inner_dirichlet_partition_faster(
            targets=ty.tolist(),
            client_sample_nums=balance_split(self.num_clients, len(ty)),
            class_priors=priors,
            **split,
        )
        for cid, idx in clients.items():
            ds = FilteredDataset(idx.tolist(), list(x), y, transform=tf)
            torch.save(ds, self.path / "train" / f"{cid}.pkl")
        for cid, idx in test_clients.items():
            ds = FilteredDataset(idx.tolist(), list(tx), ty.tolist(), transform=tf)
            torch.save(ds, self.path / "test" / f"{cid}.pkl")
        open_ds = FilteredDataset(list(range(len(x_open))), list(x_open), transform=tf)
        torch.save(open_ds, self.path / "open.pkl")
        test = FilteredDataset(list(range(len(ty))), list(tx), ty.tolist(), transform=tf)
        torch.save(test, self.path / "test" / "default.pkl")


def build(seed: int, work: Path) -> tuple[DSFLServerHandler, DSFLParallelClientTrainer]:
    s = SETTING
    seed_everything(seed, device="cpu")
    data = FashionMNIST(
        root=work / "root",
        path=work / "split",
        num_clients=s["num_clients"],
        seed=seed,
        partition="client_inner_dirichlet",
        open_size=s["open_size"],
        dir_alpha=s["dir_alpha"],
    )
    kd = {k: s[k] for k in ("kd_epochs", "kd_batch_size", "kd_lr")}
    handler = DSFLServerHandler(
        model_selector=Selector(),
        model_name="cnn",
        dataset=data,
        global_round=s["global_round"],
        num_clients=s["num_clients"],
        sample_ratio=1.0,
        device="cpu",
        era_temperature=s["era_temperature"],
        open_size_per_round=s["open_size_per_round"],
        **kd,
    )
    trainer = DSFLParallelClientTrainer(
        model_selector=Selector(),
        model_name="cnn",
        share_dir=work / "share",
        state_dir=work / "state",
        dataset=data,
        device="cpu",
        num_clients=s["num_clients"],
        epochs=s["epochs"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        seed=seed,
        num_parallels=2,
        **kd,
    )
    return handler, trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=SETTING["global_round"])
    args = ap.parse_args()
    SETTING["global_round"] = args.rounds
    import torch.multiprocessing as mp

    mp.set_start_method("spawn")  # as the example's main.py
    started = time.perf_counter()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        handler, trainer = build(args.seed, Path(tmp))
        while not handler.if_stop():
            clients = handler.sample_clients()
            trainer.local_process(handler.downlink_package(), clients)
            for pack in trainer.uplink_package():
                handler.load(pack)
            rounds.append({"round": handler.round, **handler.get_summary()})
            print(json.dumps(rounds[-1]), flush=True)
    result = {
        "reference": "blazefl 1.1.0 examples/step-by-step-dsfl on Fashion-MNIST",
        "seed": args.seed,
        "setting": SETTING,
        "rounds": rounds,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
