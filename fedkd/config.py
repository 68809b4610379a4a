"""The typed config schema (Hydra ConfigStore) and the checks Hydra cannot express.

Hydra merges `conf/` into these dataclasses, so a wrong type or an unknown key fails
at composition. `validate()` then checks values and names against the registries,
before any data is loaded or any process is started. Every failure is a
`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import inspect
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fedkd.errors import ConfigError, FedKDError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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


@dataclass
class DatasetConfig:
    name: str = "fashion_mnist"
    root: str | None = None  # searched first; then the system location; then download
    download: bool = True  # torchvision download, only when no local copy exists
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class PartitionConfig:
    name: str = "dirichlet"
    alpha: float = 0.5  # dirichlet
    min_size: int = 10  # dirichlet: re-draw until every client has this many samples
    classes_per_client: int = 2  # pathological
    shards_per_client: int = 2  # shards


@dataclass
class ModelConfig:
    student: str = "cnn_small"
    students: list[str] = field(default_factory=list)  # client i gets students[i % len]
    teacher: str = "cnn"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProxyConfig:
    size: int = 5000  # unlabeled public samples, split off the training data
    subset_size: int | None = None  # samples used per round; None = the whole proxy set


@dataclass
class TrainConfig:
    """Local training on a client."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class DistillConfig:
    temperature: float = 3.0
    alpha: float = 0.5  # weight of CE on private data; (1 - alpha) goes to KD
    server_epochs: int = 2  # teacher distillation epochs per round on the proxy subset
    server_lr: float = 0.001
    server_batch_size: int = 128


@dataclass
class EvalConfig:
    client_test_size: int | None = 2000  # per task, test samples each student is scored on
    teacher_test_size: int | None = None  # per task, for the server model; None = all
    batch_size: int = 1000


@dataclass
class LifelongConfig:
    """Task streams and mitigations against forgetting (conf/lifelong/)."""

    name: str = "none"  # none | class_incremental | domain_incremental
    num_tasks: int = 1
    rounds_per_task: int = 0  # 0: all rounds form one task
    task_classes: list[list[int]] = field(default_factory=list)  # [] = equal consecutive split
    domain: str = "rotation"  # domain_incremental: rotation | permutation
    angles: list[float] = field(default_factory=list)  # rotation per task; [] = 0..180 evenly
    proxy: str = "stationary"  # stationary (public data of all tasks) | drifting (current task)
    stagger_rounds: int = 0  # each client enters a task up to this many rounds late
    per_client_order: bool = False  # each client meets the tasks in its own order
    mitigation: str = "none"  # none | teacher_memory | client_lwf | review | replay
    memory_weight: float = 0.5  # teacher_memory: share of the teacher loss on the memory
    memory_size: int = 1000  # teacher_memory, review: proxy items remembered per past task
    lwf_weight: float = 1.0  # client_lwf: weight of the KD toward the previous student
    review_fraction: float = 0.3  # review: share of sampled clients that review
    replay_size: int = 100  # replay: private exemplars kept per past task per client


@dataclass
class SimulationConfig:
    num_cpus: int = 1  # per client (Ray resources); also torch threads per client
    num_gpus: Any = 0  # per client: a fraction, or "auto" (share visible GPUs, 0 on CPU)
    ray_address: str | None = None  # join an existing Ray cluster ("auto" or host:port)
    register_timeout: float = 120.0  # seconds to wait for all nodes before round 1
    round_timeout: float | None = None  # seconds; late replies are dropped
    client_state_dir: str | None = None  # default: <run dir>/client_state
    keep_client_state: bool = True
    fast_dispatch: bool = True  # fedkd/flower_patches.py: O(messages) delivery, 10 ms polling
    verbose: bool = False  # show Flower's and Ray's own logs


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


@dataclass
class PrivacyConfig:
    """Differential privacy (fedkd/privacy/): none, sample (DP-SGD) or client (uploads)."""

    mode: str = "none"  # none | sample | client
    noise_multiplier: float = 1.0  # noise std over the L2 sensitivity
    max_grad_norm: float = 1.0  # sample: per-example gradient clip
    clip_norm: float = 5.0  # client: L2 bound on each row of a client's logits
    delta: float = 1e-5


@dataclass
class OutputConfig:
    plots: bool = True
    progress: bool = True
    checkpoint: bool = True


@dataclass
class FedKDConfig:
    seed: int = 0
    rounds: int = 20
    num_clients: int = 10
    clients_per_round: int = 10
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: Any = MISSING  # each strategy has its own keys; see validate_strategy()
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lifelong: LifelongConfig = field(default_factory=LifelongConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="fedkd_schema", node=FedKDConfig)


register_schema()


def _one_of(options: list[str]) -> str:
    return "one of " + ", ".join(sorted(options))


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def group_options(group: str) -> list[str]:
    """The config files available in a group of conf/ (what `group=NAME` accepts)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def validate(cfg: DictConfig) -> None:
    """Check every value Hydra's types cannot; raise ConfigError on the first bad one."""
    from fedkd.data.datasets import list_datasets
    from fedkd.data.partition import list_partitioners
    from fedkd.models import list_models

    _require(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _require(cfg.rounds >= 1, "rounds", cfg.rounds, "an integer >= 1")
    _require(cfg.num_clients >= 1, "num_clients", cfg.num_clients, "an integer >= 1")
    _require(
        1 <= cfg.clients_per_round <= cfg.num_clients,
        "clients_per_round",
        cfg.clients_per_round,
        f"an integer from 1 to num_clients ({cfg.num_clients})",
    )

    ds = cfg.dataset
    _require(ds.name in list_datasets(), "dataset.name", ds.name, _one_of(list_datasets()))
    syn = ds.synthetic
    _require(syn.num_classes >= 2, "dataset.synthetic.num_classes", syn.num_classes, ">= 2")
    _require(syn.channels in (1, 3), "dataset.synthetic.channels", syn.channels, "1 or 3")
    _require(syn.image_size >= 4, "dataset.synthetic.image_size", syn.image_size, ">= 4")
    _require(syn.train_size >= 1, "dataset.synthetic.train_size", syn.train_size, ">= 1")
    _require(syn.test_size >= 1, "dataset.synthetic.test_size", syn.test_size, ">= 1")
    _require(syn.noise >= 0, "dataset.synthetic.noise", syn.noise, ">= 0")

    part = cfg.partition
    _require(
        part.name in list_partitioners(), "partition.name", part.name, _one_of(list_partitioners())
    )
    _require(part.alpha > 0, "partition.alpha", part.alpha, "a number > 0")
    _require(part.min_size >= 0, "partition.min_size", part.min_size, "an integer >= 0")
    _require(
        part.classes_per_client >= 1,
        "partition.classes_per_client",
        part.classes_per_client,
        "an integer >= 1",
    )
    _require(
        part.shards_per_client >= 1,
        "partition.shards_per_client",
        part.shards_per_client,
        "an integer >= 1",
    )

    models = list_models()
    _require(cfg.model.student in models, "model.student", cfg.model.student, _one_of(models))
    _require(cfg.model.teacher in models, "model.teacher", cfg.model.teacher, _one_of(models))
    for i, name in enumerate(cfg.model.students):
        _require(name in models, f"model.students[{i}]", name, _one_of(models))

    _require(cfg.proxy.size >= 1, "proxy.size", cfg.proxy.size, "an integer >= 1")
    sub = cfg.proxy.subset_size
    _require(
        sub is None or 1 <= sub <= cfg.proxy.size,
        "proxy.subset_size",
        sub,
        f"null (whole proxy set) or an integer from 1 to proxy.size ({cfg.proxy.size})",
    )

    tr = cfg.train
    _require(tr.epochs >= 1, "train.epochs", tr.epochs, "an integer >= 1")
    _require(tr.batch_size >= 1, "train.batch_size", tr.batch_size, "an integer >= 1")
    _require(tr.lr > 0, "train.lr", tr.lr, "a number > 0")
    _require(0 <= tr.momentum < 1, "train.momentum", tr.momentum, "a number in [0, 1)")
    _require(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, "a number >= 0")

    kd = cfg.distill
    _require(kd.temperature > 0, "distill.temperature", kd.temperature, "a number > 0")
    _require(0 <= kd.alpha <= 1, "distill.alpha", kd.alpha, "a number in [0, 1]")
    _require(kd.server_epochs >= 0, "distill.server_epochs", kd.server_epochs, "an integer >= 0")
    _require(kd.server_lr > 0, "distill.server_lr", kd.server_lr, "a number > 0")
    _require(kd.server_batch_size >= 1, "distill.server_batch_size", kd.server_batch_size, ">= 1")

    ev = cfg.eval
    _require(
        ev.client_test_size is None or ev.client_test_size >= 1,
        "eval.client_test_size",
        ev.client_test_size,
        "null (whole test set) or an integer >= 1",
    )
    _require(
        ev.teacher_test_size is None or ev.teacher_test_size >= 1,
        "eval.teacher_test_size",
        ev.teacher_test_size,
        "null (whole test split) or an integer >= 1",
    )
    _require(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, "an integer >= 1")

    validate_lifelong(cfg)

    sim = cfg.simulation
    _require(sim.num_cpus >= 1, "simulation.num_cpus", sim.num_cpus, "a whole number >= 1")
    gpus = sim.num_gpus
    _require(
        gpus == "auto"
        or (isinstance(gpus, int | float) and not isinstance(gpus, bool) and gpus >= 0),
        "simulation.num_gpus",
        gpus,
        '"auto" or a number >= 0 (a fraction shares a GPU between clients)',
    )
    _require(sim.register_timeout > 0, "simulation.register_timeout", sim.register_timeout, "> 0")
    _require(
        sim.round_timeout is None or sim.round_timeout > 0,
        "simulation.round_timeout",
        sim.round_timeout,
        "null (wait for every reply) or a number of seconds > 0",
    )

    validate_faults(cfg)
    validate_privacy(cfg)
    validate_strategy(cfg)


def validate_faults(cfg: DictConfig) -> None:
    from fedkd.faults import ADVERSARIAL_MODES, CORRUPT_MODES

    f = cfg.faults
    for key in ("client_crash_prob", "straggler_prob", "corrupt_prob", "adversarial_fraction"):
        _require(0 <= f[key] <= 1, f"faults.{key}", f[key], "a probability in [0, 1]")
    total = f.client_crash_prob + f.straggler_prob + f.corrupt_prob
    _require(
        total <= 1,
        "faults.corrupt_prob",
        f.corrupt_prob,
        f"at most 1 - client_crash_prob - straggler_prob (the three sum to {total:g})",
    )
    _require(f.straggler_delay >= 0, "faults.straggler_delay", f.straggler_delay, ">= 0 seconds")
    _require(
        f.corrupt_mode in CORRUPT_MODES,
        "faults.corrupt_mode",
        f.corrupt_mode,
        _one_of(list(CORRUPT_MODES)),
    )
    _require(
        f.adversarial_mode in ADVERSARIAL_MODES,
        "faults.adversarial_mode",
        f.adversarial_mode,
        _one_of(list(ADVERSARIAL_MODES)),
    )
    _require(
        1 <= f.min_replies <= cfg.clients_per_round,
        "faults.min_replies",
        f.min_replies,
        f"an integer from 1 to clients_per_round ({cfg.clients_per_round})",
    )


def validate_privacy(cfg: DictConfig) -> None:
    from fedkd.privacy import MODES

    pv = cfg.privacy
    _require(pv.mode in MODES, "privacy.mode", pv.mode, _one_of(list(MODES)))
    _require(pv.noise_multiplier >= 0, "privacy.noise_multiplier", pv.noise_multiplier, ">= 0")
    _require(pv.max_grad_norm > 0, "privacy.max_grad_norm", pv.max_grad_norm, "a number > 0")
    _require(pv.clip_norm > 0, "privacy.clip_norm", pv.clip_norm, "a number > 0")
    _require(0 < pv.delta < 1, "privacy.delta", pv.delta, "a number in (0, 1)")
    if pv.mode == "sample":
        _require(
            cfg.lifelong.mitigation not in ("client_lwf", "replay"),
            "lifelong.mitigation",
            cfg.lifelong.mitigation,
            "none, teacher_memory or review with privacy.mode=sample "
            "(client_lwf and replay add private-data losses outside DP-SGD)",
        )


def validate_lifelong(cfg: DictConfig) -> None:
    from fedkd.data.federated import PROXY_MODES
    from fedkd.data.tasks import DOMAINS, STREAMS
    from fedkd.mitigations import list_mitigations

    ll = cfg.lifelong
    _require(ll.name in STREAMS, "lifelong.name", ll.name, _one_of(list(STREAMS)))
    _require(ll.num_tasks >= 1, "lifelong.num_tasks", ll.num_tasks, "an integer >= 1")
    _require(ll.rounds_per_task >= 0, "lifelong.rounds_per_task", ll.rounds_per_task, ">= 0")
    if ll.name == "class_incremental":
        from fedkd.data.datasets import num_classes_of

        classes = num_classes_of(cfg.dataset)
        _require(
            ll.num_tasks <= classes,
            "lifelong.num_tasks",
            ll.num_tasks,
            f"at most the {classes} classes of {cfg.dataset.name}",
        )
    if ll.name != "none":
        rpt = ll.rounds_per_task or cfg.rounds // ll.num_tasks
        _require(
            rpt >= 1 and ll.num_tasks * rpt <= cfg.rounds,
            "lifelong.rounds_per_task",
            ll.rounds_per_task,
            f"at least 1 and at most rounds / num_tasks = {cfg.rounds // ll.num_tasks} "
            f"(num_tasks x rounds_per_task must fit in rounds={cfg.rounds})",
        )
    _require(ll.domain in DOMAINS, "lifelong.domain", ll.domain, _one_of(list(DOMAINS)))
    _require(ll.proxy in PROXY_MODES, "lifelong.proxy", ll.proxy, _one_of(list(PROXY_MODES)))
    _require(ll.stagger_rounds >= 0, "lifelong.stagger_rounds", ll.stagger_rounds, ">= 0")
    mitigations = list_mitigations()
    _require(
        ll.mitigation in mitigations, "lifelong.mitigation", ll.mitigation, _one_of(mitigations)
    )
    _require(0 <= ll.memory_weight < 1, "lifelong.memory_weight", ll.memory_weight, "in [0, 1)")
    _require(ll.memory_size >= 1, "lifelong.memory_size", ll.memory_size, "an integer >= 1")
    _require(ll.lwf_weight >= 0, "lifelong.lwf_weight", ll.lwf_weight, "a number >= 0")
    _require(
        0 <= ll.review_fraction <= 1, "lifelong.review_fraction", ll.review_fraction, "in [0, 1]"
    )
    _require(ll.replay_size >= 1, "lifelong.replay_size", ll.replay_size, "an integer >= 1")


def validate_strategy(cfg: DictConfig) -> None:
    """Strategies are built by `_target_`; their keys must match the constructor."""
    from strategies import build_strategy, strategy_class

    node = cfg.strategy
    options = group_options("strategy")
    if not isinstance(node, DictConfig) or "_target_" not in node or "name" not in node:
        raise ConfigError("strategy", node, f"a config group choice, {_one_of(options)}")
    cls = strategy_class(node._target_)
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(k for k in params if k not in ("self", "cfg"))
    for key in node:
        if key not in ("_target_", "name") and key not in allowed:
            raise ConfigError(
                f"strategy.{key}",
                node[key],
                f"not a {node.name} setting; its settings are {', '.join(allowed) or 'none'}",
            )
    cls.check_config(cfg)
    build_strategy(to_plain(cfg))  # constructors check their own values


def describe_hydra_error(exc: BaseException) -> str:
    """Hydra's composition errors are multi-line; condense one to a line naming the
    key, the value and what is allowed."""
    from omegaconf.errors import OmegaConfBaseException

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


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A resolved, picklable copy (what the ClientApp closure carries to Ray workers)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def compose_config(overrides: str | list[str] = "") -> dict[str, Any]:
    """Compose conf/ with Hydra overrides (as on the fedkd-sim command line),
    validate it and return the plain config. `flwr run` apps build theirs this way.
    Raises FedKDError for anything Hydra or `validate` rejects."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException) as exc:
        raise FedKDError(f"overrides {' '.join(args)!r}: {describe_hydra_error(exc)}") from None
    validate(cfg)
    return to_plain(cfg)
