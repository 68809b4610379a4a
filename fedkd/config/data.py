"""Config sections of the data: dataset, partition, proxy set, evaluation, task stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedkd.config.checks import at_least as _at_least
from fedkd.config.checks import one_of, require

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


@dataclass
class SyntheticConfig:
    """Class-prototype images plus noise: learnable, generated, no files needed."""

    num_classes: int = 10
    channels: int = 1
    image_size: int = 12
    train_size: int = 3000
    test_size: int = 600
    noise: float = 0.35
    seed: int = 0

    def check(self) -> None:
        p = "dataset.synthetic"
        _at_least(self, p, num_classes=2, image_size=4, train_size=1, test_size=1, noise=0)
        require(self.channels in (1, 3), f"{p}.channels", self.channels, "1 or 3")


@dataclass
class DatasetConfig:
    """Which dataset; docs/datasets.md describes every one and its keys."""

    name: str = "fashion_mnist"
    root: str | None = None  # searched first; then the system location; then download
    download: bool = True  # torchvision download, only when no local copy exists
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # hf: a Hugging Face dataset name or a save_to_disk directory; folder: the
    # directory holding train/ and test/
    path: str | None = None
    subset: str | None = None  # hf: the dataset's configuration (load_dataset's name)
    image_key: str = "image"  # hf: the image column
    label_key: str = "label"  # hf: the label column
    owner_key: str | None = None  # hf: the column naming each sample's owner (partition=natural)
    train_split: str = "train"  # hf
    test_split: str | None = "test"  # hf; null: hold out test_fraction of train_split
    test_fraction: float = 0.1  # hf, with test_split null

    def check(self) -> None:
        from fedkd.data.datasets import list_datasets

        require(self.name in list_datasets(), "dataset.name", self.name, one_of(list_datasets()))
        self.synthetic.check()
        require(
            0 < self.test_fraction < 1,
            "dataset.test_fraction",
            self.test_fraction,
            "a number between 0 and 1 (exclusive)",
        )
        if self.name in ("hf", "folder"):
            require(
                bool(self.path),
                "dataset.path",
                self.path,
                "a Hugging Face dataset name or a save_to_disk directory"
                if self.name == "hf"
                else "a directory holding train/<class index>/ and test/<class index>/",
            )

    @property
    def num_classes(self) -> int:
        from fedkd.data.datasets import num_classes_of

        return num_classes_of(self)


@dataclass
class PartitionConfig:
    name: str = "dirichlet"
    alpha: float = 0.5  # dirichlet, inner_dirichlet
    min_size: int = 10  # dirichlet: re-draw until every client has this many samples
    classes_per_client: int = 2  # pathological
    shards_per_client: int = 2  # shards

    def check(self) -> None:
        from fedkd.data.partition import list_partitioners

        names = list_partitioners()
        require(self.name in names, "partition.name", self.name, one_of(names))
        require(self.alpha > 0, "partition.alpha", self.alpha, "a number > 0")
        _at_least(self, "partition", min_size=0, classes_per_client=1, shards_per_client=1)


@dataclass
class ProxyConfig:
    size: int = 5000  # unlabeled public samples, split off the training data
    subset_size: int | None = None  # samples used per round; None = the whole proxy set

    def check(self) -> None:
        require(self.size >= 1, "proxy.size", self.size, "an integer >= 1")
        sub = self.subset_size
        require(
            sub is None or 1 <= sub <= self.size,
            "proxy.subset_size",
            sub,
            f"null (whole proxy set) or an integer from 1 to proxy.size ({self.size})",
        )

    @property
    def per_round(self) -> int:
        return self.subset_size or self.size


@dataclass
class EvalConfig:
    client_test_size: int | None = 2000  # per task, test samples each student is scored on
    teacher_test_size: int | None = None  # per task, for the server model; None = all
    batch_size: int = 1000

    def check(self) -> None:
        for key in ("client_test_size", "teacher_test_size"):
            value = getattr(self, key)
            require(
                value is None or value >= 1,
                f"eval.{key}",
                value,
                "null (whole test set) or an integer >= 1",
            )
        _at_least(self, "eval", batch_size=1)


@dataclass
class LifelongConfig:
    """Task streams (conf/lifelong/); mitigations have their own group (conf/mitigation/)."""

    name: str = "none"  # none | class_incremental | domain_incremental
    num_tasks: int = 1
    rounds_per_task: int = 0  # 0: all rounds form one task
    task_classes: list[list[int]] = field(default_factory=list)  # [] = equal consecutive split
    domain: str = "rotation"  # domain_incremental: rotation | permutation
    angles: list[float] = field(default_factory=list)  # rotation per task; [] = 0..180 evenly
    proxy: str = "stationary"  # stationary (public data of all tasks) | drifting (current task)
    stagger_rounds: int = 0  # each client enters a task up to this many rounds late
    per_client_order: bool = False  # each client meets the tasks in its own order

    def check(self, cfg: FedKDConfig) -> None:
        from fedkd.data.federated import PROXY_MODES
        from fedkd.data.tasks import DOMAINS, STREAMS

        require(self.name in STREAMS, "lifelong.name", self.name, one_of(list(STREAMS)))
        _at_least(self, "lifelong", num_tasks=1, rounds_per_task=0, stagger_rounds=0)
        if self.name == "class_incremental":
            classes = cfg.dataset.num_classes
            require(
                self.num_tasks <= classes,
                "lifelong.num_tasks",
                self.num_tasks,
                f"at most the {classes} classes of {cfg.dataset.name}",
            )
        if self.name != "none":
            rpt = self.rounds_per_task or cfg.rounds // self.num_tasks
            require(
                rpt >= 1 and self.num_tasks * rpt <= cfg.rounds,
                "lifelong.rounds_per_task",
                self.rounds_per_task,
                f"at least 1 and at most rounds / num_tasks = {cfg.rounds // self.num_tasks} "
                f"(num_tasks x rounds_per_task must fit in rounds={cfg.rounds})",
            )
        require(self.domain in DOMAINS, "lifelong.domain", self.domain, one_of(list(DOMAINS)))
        require(self.proxy in PROXY_MODES, "lifelong.proxy", self.proxy, one_of(PROXY_MODES))
