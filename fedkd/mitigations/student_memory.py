"""student_memory: the teacher's memory reaches the students, exemplar-free.

`teacher_memory` keeps the server model's old tasks alive, but students only ever
distill on the current task's proxy items, so the models on the devices forget. This
mitigation is `teacher_memory` on the server plus a rehearsal on every student: while
it learns a new task, a student also distills toward the teacher's soft labels on
items of past tasks (`student_weight * tau^2 * KL`, one pass over the items per
epoch, beside the usual CE + KD). No private data is kept anywhere. Where the items
and their labels come from is `source`:

- `bank`: each client keeps `student_items` public items of every past task with the
  teacher's soft labels it received on them in its last round of that task (public
  data and labels it already had). No extra bytes; the bank lives in the client's
  store (float16 images and labels: about 1.6 KB per Fashion-MNIST item).
- `broadcast`: each round the server sends the current teacher's soft labels on
  `student_items` freshly sampled public items of every past task (a record
  "memory"; the plan names the items, the client rebuilds them from its public
  data). Costs past tasks x `student_items` x classes soft labels down per client
  and round, counted in `bytes_down`; nothing extra up.
- `synthetic` (data-free, for a proxy set that drifts away for good): no past-task
  public item is kept anywhere. At the end of each task the server synthesises
  `synthetic_items` inputs from its teacher by model inversion (task_synthesis.py,
  fedkd/inversion.py) for the classes the teacher predicts on that task's public
  items; they replace the public items in the teacher's memory, and each round
  `student_items` of them per past task travel to the students with the teacher's
  soft labels (the inputs as float16 in a record "memory-inputs": about 1.6 KB per
  Fashion-MNIST item, counted in `bytes_down`).

Works with the strategies `teacher_memory` serves (a server model) whose clients
train; `bank` needs a strategy that sends soft labels (dsfl, fedmd, feddf).
Not under DP-SGD (privacy.mode=sample): its steps do not take the rehearsal yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedkd.comm.codecs import check, decode, encode
from fedkd.comm.npy import array_from_numpy
from fedkd.config import require
from fedkd.loss_terms import Rehearsal
from fedkd.mitigations.base import MITIGATIONS, ClientExtras
from fedkd.mitigations.task_synthesis import synthesise_task
from fedkd.mitigations.teacher_memory import TeacherMemory, TeacherMemoryParams
from fedkd.protocol import (
    MEMORY,
    REPLY_LOGITS,
    SOFT_LABELS,
    InvalidReply,
    ProxySegment,
    RoundPlan,
    check_array,
)
from fedkd.seeding import derive_seed, numpy_rng, sample_rows
from fedkd.training import soft_labels

if TYPE_CHECKING:
    from fedkd.config import FedKDConfig
    from fedkd.mitigations import ClientRound
    from fedkd.round import Round

log = logging.getLogger("fedkd")

SOURCES = ("bank", "broadcast", "synthetic")
MEMORY_INPUTS = "memory-inputs"  # ArrayRecord down: the synthetic source's inputs
INPUTS = "inputs"


@dataclass
class StudentMemoryParams(TeacherMemoryParams):
    source: str = "bank"  # where the students' past-task items come from
    student_items: int = 200  # items per past task a student rehearses
    student_weight: float = 1.0  # weight of the rehearsal KD in a student's loss
    synthetic_items: int = 500  # synthetic: inputs synthesised per finished task
    synthesis_steps: int = 100  # synthetic: optimisation steps of the inversion

    def check(self, cfg: FedKDConfig) -> None:
        super().check(cfg)
        require(self.source in SOURCES, "mitigation.source", self.source, " or ".join(SOURCES))
        for key in ("student_items", "synthetic_items", "synthesis_steps"):
            value = getattr(self, key)
            require(value >= 1, f"mitigation.{key}", value, "an integer >= 1")
        w = self.student_weight
        require(w >= 0, "mitigation.student_weight", w, "a number >= 0")


@MITIGATIONS.register("student_memory")
class StudentMemory(TeacherMemory):
    Params = StudentMemoryParams
    name = "student_memory"
    needs_clients = True

    def __init__(self, cfg: FedKDConfig, params: StudentMemoryParams) -> None:
        super().__init__(cfg, params)
        self.params: StudentMemoryParams = params
        self.synthetic: dict[int, torch.Tensor] = {}  # task -> its synthesised inputs
        self._records: dict[Any, dict[str, ArrayRecord]] = {}  # this round's, per client task

    def check_config(self, cfg: FedKDConfig) -> None:
        super().check_config(cfg)
        require(
            cfg.privacy.mode != "sample",
            "mitigation",
            self.name,
            "teacher_memory, review or none with privacy.mode=sample "
            "(DP-SGD steps do not take the students' rehearsal)",
        )
        if self.params.source == "bank":
            from strategies import STRATEGIES

            name = cfg.strategy["name"]
            strategy = STRATEGIES.get(name)
            fits = strategy.has_server_model and strategy.uses_clients  # else it says why
            require(
                not fits or strategy.reply_kind == REPLY_LOGITS,
                "mitigation.source",
                "bank",
                f"broadcast or synthetic with {name}: a bank keeps the soft labels a "
                "client receives, and it receives none",
            )

    # ------------------------------------------------------------- server half
    def on_task_end(self, task: int) -> None:
        if self.params.source != "synthetic":
            super().on_task_end(task)
            return
        started = time.perf_counter()
        ctx, p = self.context, self.params
        teacher = ctx.server_model()
        items = ctx.data.proxy_inputs([self.task_segment(task)])  # looked at, not kept
        count, steps = p.synthetic_items, p.synthesis_steps
        x, classes = synthesise_task(
            teacher, items, ctx.data, ctx.seed, task, count, steps, ctx.device
        )
        probs = soft_labels(teacher, x, self.cfg.distill.temperature, device=ctx.device)
        self.memory.append((ProxySegment(task, 0, len(x)), probs))  # names the task only
        self.synthetic[task] = x
        log.info(
            "student_memory: %d inputs synthesised for task %d (classes %s) in %.1f s",
            len(x),
            task,
            classes,
            time.perf_counter() - started,
        )

    def memory_inputs(self) -> torch.Tensor:
        if self.params.source != "synthetic":
            return super().memory_inputs()
        return torch.cat([self.synthetic[seg.task] for seg, _ in self.memory])

    def begin_round(self, r: Round) -> None:
        self._records = {}

    def _past(self, task: int) -> list[int]:
        return [seg.task for seg, _ in self.memory if seg.task != task]

    def adjust_plan(self, r: Round, pid: int, plan: RoundPlan) -> RoundPlan:
        if self.params.source != "broadcast":
            return plan
        data, seed = self.context.data, self.context.seed
        memory = tuple(
            ProxySegment(
                t,
                derive_seed(seed, t, r.number, "student-memory"),
                min(self.params.student_items, data.proxy_pool_size(t)),
            )
            for t in self._past(plan.task)
        )
        return replace(plan, memory=memory) if memory else plan

    def client_payload(self, r, pid, plan, payload):
        source = self.params.source
        if source == "bank" or (source == "broadcast" and not plan.memory):
            return payload
        key = plan.memory if source == "broadcast" else plan.task
        if key not in self._records:  # once per round for every client at the same task
            self._records[key] = self._memory_records(r, plan)
        return {**payload, **self._records[key]}

    def _memory_records(self, r: Round, plan: RoundPlan) -> dict[str, ArrayRecord]:
        """The current teacher's soft labels on the items a client at plan.task
        rehearses (MEMORY), and the synthetic inputs themselves (MEMORY_INPUTS)."""
        ctx = self.context
        if self.params.source == "broadcast":
            x = ctx.data.proxy_inputs(list(plan.memory))
        else:
            picks = []
            for t in self._past(plan.task):
                pool = self.synthetic[t]
                rng = numpy_rng(ctx.seed, t, r.number, "student-memory")
                rows = sample_rows(rng, len(pool), self.params.student_items)
                picks.append(pool[torch.from_numpy(rows)])
            if not picks:
                return {}
            x = torch.cat(picks).half().float()  # as the client will see them
        tau = self.cfg.distill.temperature
        probs = soft_labels(ctx.server_model(), x, tau, device=ctx.device)
        records = {MEMORY: encode(probs, plan.teacher_codec, SOFT_LABELS, kind="probs")}
        if self.params.source == "synthetic":
            records[MEMORY_INPUTS] = ArrayRecord({INPUTS: array_from_numpy(x.half().numpy())})
        return records

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "synthetic": dict(self.synthetic)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.synthetic = {int(t): x for t, x in state.get("synthetic", {}).items()}

    # ------------------------------------------------------------- client half
    def client_extras(self, ctx: ClientRound) -> ClientExtras:
        bank = self.params.source == "bank"
        items = self._bank_items(ctx) if bank else self._received_items(ctx)
        if items is None:
            return ClientExtras(ctx.x, ctx.y)
        x, probs = items
        rehearsal = Rehearsal(x, probs, self.params.student_weight)
        return ClientExtras(ctx.x, ctx.y, rehearsal=rehearsal, info={"memory-items": len(x)})

    def _received_items(self, ctx: ClientRound) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The items and soft labels of the MEMORY record, checked (the server's bytes
        are untrusted too): public items the plan names, or synthetic inputs."""
        plan, data = ctx.plan, ctx.data
        record = ctx.arrays.get(MEMORY)
        if record is None or (self.params.source == "broadcast" and not plan.memory):
            return None
        try:
            if self.params.source == "broadcast":
                self._check_segments(plan.memory, data.stream.num_tasks)
                x = data.proxy_inputs(list(plan.memory))
            else:
                inputs = ctx.arrays.get(MEMORY_INPUTS, ArrayRecord())
                x = self._synthetic_inputs(inputs, data.input_shape, data.stream.num_tasks)
            shape = (len(x), data.num_classes)
            check(record, plan.teacher_codec, SOFT_LABELS, shape)
        except InvalidReply as exc:
            raise ValueError(f"malformed memory soft labels from the server: {exc}") from None
        return x, decode(record, SOFT_LABELS, plan.teacher_codec, shape, "probs")

    def _check_segments(self, segments: tuple[ProxySegment, ...], num_tasks: int) -> None:
        """At most one segment per other task, each of at most student_items items."""
        most = self.params.student_items
        tasks = [seg.task for seg in segments]
        if len(set(tasks)) != len(tasks) or not all(0 <= t < num_tasks for t in tasks):
            raise InvalidReply(f"memory names tasks {tasks}; expected distinct tasks < {num_tasks}")
        if not all(1 <= seg.count <= most for seg in segments):
            counts = [seg.count for seg in segments]
            raise InvalidReply(f"memory segments of {counts} items; expected 1 to {most} each")

    def _synthetic_inputs(
        self, record: ArrayRecord, input_shape: tuple[int, ...], num_tasks: int
    ) -> torch.Tensor:
        if list(record) != [INPUTS]:
            raise InvalidReply(f"synthetic inputs record holds {sorted(record)}, not [{INPUTS!r}]")
        n = record[INPUTS].shape[0] if record[INPUTS].shape else -1
        most = self.params.student_items * max(num_tasks - 1, 1)
        if not 1 <= n <= most:
            raise InvalidReply(f"{n} synthetic inputs, expected 1 to {most}")
        x = check_array(record, INPUTS, (n, *input_shape), np.dtype(np.float16))
        return torch.from_numpy(x).float()

    def _bank_items(self, ctx: ClientRound) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Promote the last round's labelled items of the task just left into the bank,
        note this round's for later, and return the bank's items of other tasks."""
        bank: dict[str, Any] = ctx.state.setdefault("bank", {})
        pending = ctx.state.pop("bank-pending", None)
        if ctx.new_task and pending is not None and ctx.previous_task is not None:
            bank[str(ctx.previous_task)] = pending
        if ctx.teacher_probs is not None and len(ctx.kd_x) > 0:
            rng = numpy_rng(ctx.data.seed, ctx.partition_id, ctx.plan.round, "student-bank")
            rows = torch.from_numpy(sample_rows(rng, len(ctx.kd_x), self.params.student_items))
            ctx.state["bank-pending"] = {
                "x": ctx.kd_x[rows].to(torch.float16),
                "probs": ctx.teacher_probs[rows].to(torch.float16),
            }
        kept = [v for task, v in sorted(bank.items()) if int(task) != ctx.plan.task]
        if not kept:
            return None
        x = torch.cat([v["x"] for v in kept]).float()
        probs = torch.cat([v["probs"] for v in kept]).float()
        return x, probs / probs.sum(dim=1, keepdim=True)  # float16 rounding
