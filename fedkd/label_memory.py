"""Label memory (`strategy.label_memory`): the latest soft label of every proxy item
received so far, kept by the server (aggregated client knowledge) and by each client
(the teacher's soft labels), so that both distill on every item they have labels for,
not only on the round's subset. A small subset per round, few bytes on the wire,
still covers the whole proxy set over the rounds.

A memory is an (items, classes) float tensor with NaN rows for items not yet seen:
a plain tensor, so it goes into checkpoints and client state as it is.
"""

from __future__ import annotations

import numpy as np
import torch


def new_memory(num_items: int, num_classes: int) -> torch.Tensor:
    return torch.full((num_items, num_classes), float("nan"))


def remember(memory: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> None:
    """Overwrite the rows of the proxy items in `rows` with their newest labels."""
    memory[torch.from_numpy(np.asarray(rows, np.int64))] = values.detach().float().cpu()


def recall(memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, labels) of every item that has a label, in proxy-set order."""
    rows = torch.nonzero(~memory[:, 0].isnan()).squeeze(1)
    return rows, memory[rows]
