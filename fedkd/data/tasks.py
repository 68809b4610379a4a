"""Task streams: which task each client learns at each round, and what a task is.

- `none`: one task, static data.
- `class_incremental`: the classes are split into T tasks (Split-FMNIST: 5 x 2).
- `domain_incremental`: every task has all labels, but task t sees its inputs rotated
  by angle_t or pixel-permuted by permutation_t (task 0 is the original data).

Rounds are grouped into tasks of `rounds_per_task`. With `stagger_rounds > 0`, each
client enters every task up to that many rounds late (a seeded offset per client);
with `per_client_order`, each client meets the tasks in its own seeded order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedkd.errors import ConfigError
from fedkd.seeding import numpy_rng

STREAMS = ("none", "class_incremental", "domain_incremental")
DOMAINS = ("rotation", "permutation")


@dataclass(frozen=True)
class TaskStream:
    kind: str
    num_tasks: int
    rounds_per_task: int
    task_classes: tuple[tuple[int, ...], ...]  # per task; all classes for none/domain
    domain: str
    angles: tuple[float, ...]
    stagger_rounds: int
    per_client_order: bool
    seed: int

    @property
    def lifelong(self) -> bool:
        return self.num_tasks > 1

    # ---------------------------------------------------------------- schedule
    def global_task(self, rnd: int) -> int:
        """The task of round `rnd` (1-based) in the stream's schedule (0-based task)."""
        return min((rnd - 1) // self.rounds_per_task, self.num_tasks - 1)

    def is_task_end(self, rnd: int, rounds: int) -> bool:
        """Last round of a task in the schedule (where the matrix R gets a row)."""
        t = self.global_task(rnd)
        last = rounds if t == self.num_tasks - 1 else (t + 1) * self.rounds_per_task
        return rnd == last

    def offset(self, partition_id: int) -> int:
        if self.stagger_rounds == 0:
            return 0
        rng = numpy_rng(self.seed, partition_id, "stagger")
        return int(rng.integers(0, self.stagger_rounds + 1))

    def order(self, partition_id: int) -> list[int]:
        if not self.per_client_order:
            return list(range(self.num_tasks))
        return [
            int(t)
            for t in numpy_rng(self.seed, partition_id, "task-order").permutation(self.num_tasks)
        ]

    def client_task(self, rnd: int, partition_id: int) -> int:
        """The task a client learns at round `rnd`, after its stagger and task order."""
        local = max(1, rnd - self.offset(partition_id))
        return self.order(partition_id)[self.global_task(local)]

    # ------------------------------------------------------------- transforms
    def permutation(self, task: int, num_pixels: int) -> torch.Tensor:
        if task == 0:
            return torch.arange(num_pixels)
        return torch.from_numpy(numpy_rng(self.seed, task, "permute").permutation(num_pixels))

    def transform(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Apply task `task`'s input transform (domain-incremental only)."""
        if self.kind != "domain_incremental" or task == 0 or len(x) == 0:
            return x
        if self.domain == "rotation":
            from torchvision.transforms.functional import rotate

            return rotate(x, float(self.angles[task]))
        n, c, h, w = x.shape
        perm = self.permutation(task, h * w)
        return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def build_stream(cfg: dict, num_classes: int, rounds: int, seed: int) -> TaskStream:
    """Check the `lifelong` config against the data and the number of rounds."""
    kind = cfg["name"]
    if kind not in STREAMS:
        raise ConfigError("lifelong.name", kind, "one of " + ", ".join(STREAMS))
    tasks, rpt = _schedule(cfg, kind, num_classes, rounds)
    classes = _task_classes(cfg, kind, tasks, num_classes)
    domain = cfg.get("domain", "rotation")
    if kind == "domain_incremental" and domain not in DOMAINS:
        raise ConfigError("lifelong.domain", domain, "one of " + ", ".join(DOMAINS))
    angles = _angles(cfg, kind, domain, tasks)
    stagger = int(cfg.get("stagger_rounds", 0))
    if stagger < 0 or (tasks > 1 and stagger >= rpt):
        raise ConfigError(
            "lifelong.stagger_rounds",
            stagger,
            f"an integer from 0 to rounds_per_task - 1 ({rpt - 1})",
        )
    return TaskStream(
        kind=kind,
        num_tasks=tasks,
        rounds_per_task=rpt,
        task_classes=classes,
        domain=domain,
        angles=angles,
        stagger_rounds=stagger if tasks > 1 else 0,
        per_client_order=bool(cfg.get("per_client_order", False)) and tasks > 1,
        seed=seed,
    )


def _schedule(cfg: dict, kind: str, num_classes: int, rounds: int) -> tuple[int, int]:
    """(num_tasks, rounds_per_task): the tasks must fit in the rounds (and, class-
    incremental, in the classes); `none` is one task over every round."""
    tasks = 1 if kind == "none" else int(cfg.get("num_tasks", 1))
    rpt = int(cfg.get("rounds_per_task", 0)) or rounds
    if kind == "none":
        rpt = rounds
    if tasks < 1:
        raise ConfigError("lifelong.num_tasks", tasks, "an integer >= 1")
    if kind == "class_incremental" and tasks > num_classes:
        raise ConfigError(
            "lifelong.num_tasks", tasks, f"at most the {num_classes} classes of the dataset"
        )
    if tasks * rpt > rounds:
        raise ConfigError(
            "lifelong.rounds_per_task",
            rpt,
            f"at most rounds / num_tasks = {rounds} // {tasks} = {rounds // tasks} "
            f"(num_tasks x rounds_per_task must fit in rounds={rounds})",
        )
    return tasks, rpt


def _task_classes(
    cfg: dict, kind: str, tasks: int, num_classes: int
) -> tuple[tuple[int, ...], ...]:
    """The classes of each task: all of them unless class-incremental, where they are
    `task_classes` as given or else split evenly in order."""
    all_classes = tuple(range(num_classes))
    if kind != "class_incremental":
        return (all_classes,) * tasks
    explicit = [list(t) for t in cfg.get("task_classes") or []]
    if not explicit:
        splits = np.array_split(np.arange(num_classes), tasks)
        return tuple(tuple(int(c) for c in s) for s in splits)
    if len(explicit) != tasks:
        raise ConfigError(
            "lifelong.task_classes", explicit, f"a list of num_tasks={tasks} class lists"
        )
    flat = [c for t in explicit for c in t]
    empty = [i for i, t in enumerate(explicit) if not t]
    if empty:
        raise ConfigError("lifelong.task_classes", explicit, f"no empty task (task {empty[0]} is)")
    if len(set(flat)) != len(flat) or not set(flat) <= set(all_classes):
        raise ConfigError(
            "lifelong.task_classes",
            explicit,
            f"disjoint class ids from 0 to {num_classes - 1}",
        )
    return tuple(tuple(int(c) for c in t) for t in explicit)


def _angles(cfg: dict, kind: str, domain: str, tasks: int) -> tuple[float, ...]:
    """Each task's rotation (domain-incremental by rotation): `angles` as given, or
    else evenly spaced over [0, 180) with task 0 unrotated."""
    angles = tuple(float(a) for a in cfg.get("angles") or [])
    if kind == "domain_incremental" and domain == "rotation":
        if not angles:
            angles = tuple(float(a) for a in np.linspace(0, 180, tasks, endpoint=False))
        if len(angles) != tasks:
            raise ConfigError("lifelong.angles", list(angles), f"num_tasks={tasks} angles (or [])")
    return angles
