"""EMA teacher: a frozen fp32 copy of student modules, moved towards them once per optimizer step.

The teacher is deliberately *not* a registered submodule of the objective: it must stay out of the optimizer
and out of DeepSpeed's parameter partitioning (ZeRO-3), and it stays in fp32 even when the student trains in
bf16 (an EMA with tau 0.996 in bf16 would round most updates away). The engine saves it via `state_dict()`
and, under ZeRO-3, sets `gather` to a context manager that all-gathers the partitioned student parameters.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
from torch import nn


def cosine_tau(step_index: int, total_steps: int, tau_base: float) -> float:
    """BYOL schedule tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, k and K in optimizer steps."""
    k = min(max(step_index, 0), total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


class EMATeacher:
    """teacher <- tau * teacher + (1 - tau) * student, over all parameters; buffers (BatchNorm statistics)
    are the teacher's own, updated only by the teacher's forward passes.

    >>> teacher = EMATeacher({"encoder": enc, "projector": proj}, tau_base=0.996)
    >>> teacher.update(step=1, total_steps=100)   # after optimizer step 1
    """

    def __init__(self, students: dict[str, nn.Module], tau_base: float = 0.996, schedule: str = "cosine"):
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown EMA schedule '{schedule}' (cosine | constant)")
        self.students = students  # references, not copies
        self.modules = nn.ModuleDict({k: copy.deepcopy(m) for k, m in students.items()}).float()
        for p in self.modules.parameters():
            p.requires_grad_(False)
        self.tau_base = tau_base
        self.schedule = schedule
        self.tau = tau_base
        self.updates = 0
        self.gather: Callable[[list[nn.Parameter]], contextlib.AbstractContextManager] = (
            lambda params: contextlib.nullcontext())

    def add(self, name: str, student: nn.Module) -> None:
        """Follow one more student module (a head built after the teacher), as the constructor does."""
        self.students[name] = student
        copy_ = copy.deepcopy(student).float()
        for p in copy_.parameters():
            p.requires_grad_(False)
        self.modules[name] = copy_

    def __getitem__(self, name: str) -> nn.Module:
        return self.modules[name]

    def to(self, device) -> "EMATeacher":
        self.modules.to(device)
        return self

    def tau_for(self, step: int, total_steps: int) -> float:
        """tau used by the update that follows optimizer step `step` (1-based): k = step - 1."""
        if self.schedule == "constant":
            return self.tau_base
        return cosine_tau(step - 1, total_steps, self.tau_base)

    @torch.no_grad()
    def update(self, step: int, total_steps: int) -> None:
        self.tau = self.tau_for(step, total_steps)
        for name, student in self.students.items():
            s_params = list(student.parameters())
            with self.gather(s_params):
                for t, s in zip(self.modules[name].parameters(), s_params):
                    t.lerp_(s.detach().to(t.dtype), 1.0 - self.tau)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in self.modules.state_dict().items()}
        sd["_updates"] = torch.tensor(self.updates, dtype=torch.int64)
        sd["_tau"] = torch.tensor(self.tau, dtype=torch.float64)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        sd = dict(sd)
        self.updates = int(sd.pop("_updates"))
        self.tau = float(sd.pop("_tau"))
        self.modules.load_state_dict(sd, strict=True)
