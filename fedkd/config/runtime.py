"""Config sections of the run: simulation resources, injected faults, privacy, output,
experiment trackers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from fedkd.config.checks import one_of, require

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig


EXECUTIONS = ["auto", "cohort", "per_client"]


@dataclass
class SimulationConfig:
    num_cpus: int = 1  # per client (Ray resources); also torch threads per client
    num_gpus: Any = 0  # per client: a fraction, or "auto" (share visible GPUs, 0 on CPU)
    ray_address: str | None = None  # join an existing Ray cluster ("auto" or host:port)
    register_timeout: float = 120.0  # seconds to wait for all nodes before round 1
    round_timeout: float | None = None  # seconds; late replies are dropped
    client_state_dir: str | None = None  # <run dir>/client_state; if set, a folder per run
    keep_client_state: bool = True
    fast_dispatch: bool = True  # fedkd/flower_patches.py: O(messages) delivery, 10 ms polling
    verbose: bool = False  # show Flower's and Ray's own logs
    # fedkd/cohort.py: per_client (a node and a message per client) | cohort (a node
    # serves a group of partitions, one message per node and round) | auto
    execution: str = "auto"
    cohort_nodes: int | None = None  # cohort: simulated nodes (null: 4 per client slot)

    def check(self) -> None:
        require(self.num_cpus >= 1, "simulation.num_cpus", self.num_cpus, "a whole number >= 1")
        gpus = self.num_gpus
        require(
            gpus == "auto"
            or (isinstance(gpus, int | float) and not isinstance(gpus, bool) and gpus >= 0),
            "simulation.num_gpus",
            gpus,
            '"auto" or a number >= 0 (a fraction shares a GPU between clients)',
        )
        require(
            self.register_timeout > 0, "simulation.register_timeout", self.register_timeout, "> 0"
        )
        require(
            self.execution in EXECUTIONS, "simulation.execution", self.execution, one_of(EXECUTIONS)
        )
        require(
            self.cohort_nodes is None or self.cohort_nodes >= 1,
            "simulation.cohort_nodes",
            self.cohort_nodes,
            "null (4 per client slot) or a whole number >= 1",
        )
        require(
            self.round_timeout is None or self.round_timeout > 0,
            "simulation.round_timeout",
            self.round_timeout,
            "null (wait for every reply) or a number of seconds > 0",
        )


@dataclass
class FaultsConfig:
    """Injected client faults (fedkd/faults.py); probabilities per client and round."""

    client_crash_prob: float = 0.0
    straggler_prob: float = 0.0
    straggler_delay: float = 30.0  # seconds a straggler sleeps before replying
    corrupt_prob: float = 0.0
    corrupt_mode: str = "nan"  # nan | garbage
    adversarial_fraction: float = 0.0  # share of partitions sending hostile logits
    adversarial_mode: str = "flipped"  # flipped | uniform | extreme
    min_replies: int = 1  # fewer valid replies than this: the round is skipped
    hostile_fraction: float = 0.0  # share of partitions whose replies are hostile (tests)
    hostile_kinds: list[str] = field(default_factory=list)  # fedkd/hostile.py; []: all

    def check(self, cfg: FedKDConfig) -> None:
        from fedkd.faults import ADVERSARIAL_MODES, CORRUPT_MODES
        from fedkd.hostile import KINDS

        for kind in self.hostile_kinds:
            require(kind in KINDS, "faults.hostile_kinds", kind, one_of(list(KINDS)))
        probabilities = ("client_crash_prob", "straggler_prob", "corrupt_prob")
        for key in (*probabilities, "adversarial_fraction", "hostile_fraction"):
            value = getattr(self, key)
            require(0 <= value <= 1, f"faults.{key}", value, "a probability in [0, 1]")
        total = self.client_crash_prob + self.straggler_prob + self.corrupt_prob
        require(
            total <= 1,
            "faults.corrupt_prob",
            self.corrupt_prob,
            f"at most 1 - client_crash_prob - straggler_prob (the three sum to {total:g})",
        )
        require(
            self.straggler_delay >= 0,
            "faults.straggler_delay",
            self.straggler_delay,
            ">= 0 seconds",
        )
        for key, modes in (
            ("corrupt_mode", CORRUPT_MODES),
            ("adversarial_mode", ADVERSARIAL_MODES),
        ):
            value = getattr(self, key)
            require(value in modes, f"faults.{key}", value, one_of(list(modes)))
        require(
            1 <= self.min_replies <= cfg.clients_per_round,
            "faults.min_replies",
            self.min_replies,
            f"an integer from 1 to clients_per_round ({cfg.clients_per_round})",
        )


@dataclass
class PrivacyConfig:
    """Differential privacy (fedkd/privacy/): none, sample (DP-SGD) or client (uploads)."""

    mode: str = "none"  # none | sample | client
    noise_multiplier: float = 1.0  # noise std over the L2 sensitivity
    max_grad_norm: float = 1.0  # sample: per-example gradient clip
    clip_norm: float = 5.0  # client: L2 bound on each row of a client's logits
    delta: float = 1e-5
    # DP noise from the OS CSPRNG (fedkd/privacy/noise.py); false: seeded, so a study
    # can replay it (and so can anyone who reads the config: no privacy against them)
    secure_noise: bool = True
    # sample: DP-SGD's own settings for the private steps (null: train.*). DP-SGD
    # wants larger batches, a higher learning rate, fewer epochs and a bounded
    # activation than plain SGD (docs/privacy.md)
    batch_size: int | None = None  # expected Poisson batch (sample rate = batch / shard)
    lr: float | None = None
    epochs: int | None = None
    momentum: float | None = None
    optimizer: str = "sgd"  # sgd | adam
    activation: str | None = None  # the students' activation: null (the model's own) | tanh

    def check(self) -> None:
        from fedkd.privacy import ACTIVATIONS, MODES, OPTIMIZERS

        require(self.mode in MODES, "privacy.mode", self.mode, one_of(list(MODES)))
        for key, low in (("batch_size", 1), ("epochs", 1)):
            value = getattr(self, key)
            require(value is None or value >= low, f"privacy.{key}", value, f"null or >= {low}")
        require(self.lr is None or self.lr > 0, "privacy.lr", self.lr, "null or a number > 0")
        momentum = self.momentum
        require(
            momentum is None or 0 <= momentum < 1, "privacy.momentum", momentum, "null or in [0, 1)"
        )
        require(
            self.optimizer in OPTIMIZERS, "privacy.optimizer", self.optimizer, one_of(OPTIMIZERS)
        )
        require(
            self.activation is None or self.activation in ACTIVATIONS,
            "privacy.activation",
            self.activation,
            "null or " + one_of(list(ACTIVATIONS)),
        )
        require(
            self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, ">= 0"
        )
        require(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "a number > 0")
        require(self.clip_norm > 0, "privacy.clip_norm", self.clip_norm, "a number > 0")
        require(0 < self.delta < 1, "privacy.delta", self.delta, "a number in (0, 1)")


@dataclass
class OutputConfig:
    plots: bool = True
    progress: bool = True
    checkpoint: bool = True
    overwrite: bool = False  # fedkd-sim into a directory holding a run: replace it


@dataclass
class TensorBoardLogger:
    """Event files in the run directory's tensorboard/ folder: `tensorboard --logdir`
    on any folder above runs (a sweep's, outputs/) shows each as a run."""

    enabled: bool = False  # logger=tensorboard sets it


@dataclass
class MLflowLogger:
    enabled: bool = False  # logger=mlflow sets it
    # null: sqlite:///SWEEP_DIR/mlflow.db for a multirun's jobs, else mlflow.db in the
    # run directory's parent (every run beside it shares it)
    tracking_uri: str | None = None
    experiment: str = "fedkd"  # one experiment for all jobs of a sweep
    run_name: str | None = None  # null: the run directory's name (a sweep's job: its subdir)

    def check(self) -> None:
        uri = self.tracking_uri
        require(
            uri is None or _URI.fullmatch(uri) is not None,
            "logger.mlflow.tracking_uri",
            uri,
            "null (a sqlite store beside the run) or a URI such as "
            "sqlite:////abs/path/mlflow.db or http://host:5000",
        )
        name = self.experiment
        require(bool(name.strip()), "logger.mlflow.experiment", name, "a non-empty name")
        name = self.run_name
        require(name is None or bool(name.strip()), "logger.mlflow.run_name", name, _NAME)


@dataclass
class CsvLogger:
    enabled: bool = False  # logger=csv sets it
    filename: str = "metrics.csv"  # in the run directory, one row per round

    def check(self) -> None:
        name = self.filename
        require(
            _FILE.fullmatch(name) is not None,
            "logger.csv.filename",
            name,
            "a file name ending in .csv (it is written in the run directory)",
        )


@dataclass
class LoggerConfig:
    """Experiment trackers (fedkd/results/trackers/); conf/logger/ enables them,
    several at once with `logger=[tensorboard,mlflow]`."""

    tensorboard: TensorBoardLogger = field(default_factory=TensorBoardLogger)
    mlflow: MLflowLogger = field(default_factory=MLflowLogger)
    csv: CsvLogger = field(default_factory=CsvLogger)

    def enabled(self) -> list[str]:
        """The trackers this run feeds, by name (each field is one tracker's section)."""
        return [f.name for f in fields(self) if getattr(self, f.name).enabled]

    def check(self) -> None:
        self.mlflow.check()
        self.csv.check()


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")
_FILE = re.compile(r"[A-Za-z0-9_.-]*[A-Za-z0-9_-]\.csv")
_NAME = "null or a non-empty name"
