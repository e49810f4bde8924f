"""Stacked optimizers against the real ones: each member of a stack ends where the same member trained
alone ends (torch's AdamW or transformers' Adafactor, clip_grad_norm_, its own lr scheduler), through
members leaving, joining from a solo state dict and checkpointing; and a step costs the same ATen ops
for 8 members as for 1."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
from transformers.optimization import Adafactor

from ptlab.training.stacked_optim import MemberHyper, StackedAdafactor, StackedAdamW

SHAPES = [(5, 16), (3, 16), (3,)]  # a prompt, a head weight, a head bias
TOTAL_STEPS = 20
STACKED = {"adamw": StackedAdamW, "adafactor": StackedAdafactor}
# a pack's lr schedulers sit on stand-in optimizers that never step themselves
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


@dataclass(frozen=True)
class Spec:
    """A member: its seed (initial parameters, gradients), hyperparameters and lr schedule."""

    seed: int
    lr: float
    weight_decay: float
    max_grad_norm: float | None
    schedule: str
    warmup: int

    def hyper(self, lr: float) -> MemberHyper:
        return MemberHyper(lr, self.weight_decay, self.max_grad_norm)


SPECS = [
    Spec(0, 1e-2, 0.0, None, "linear", 3),  # never clipped
    Spec(1, 3e-2, 0.1, 0.05, "constant", 5),  # clipped at every step
    Spec(2, 5e-3, 0.01, 4.0, "linear", 0),
    Spec(3, 2e-2, 0.05, 8.0, "constant", 2),
    Spec(4, 1.5e-2, 0.02, 2.0, "linear", 4),  # joins a stack from its solo state dict
]


def initial_params(spec: Spec) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def gradients(spec: Spec, step: int) -> list[torch.Tensor]:
    """Seeded random gradients; their scale varies by member and step so that Adafactor's update
    clipping and the members' gradient clipping both act."""
    generator = torch.Generator().manual_seed(1000 * spec.seed + step)
    scale = (1 + spec.seed) * (1 + step % 4)
    return [scale * torch.randn(shape, generator=generator) for shape in SHAPES]


def schedule(spec: Spec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    if spec.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, spec.warmup, num_training_steps=TOTAL_STEPS)
    return get_constant_schedule_with_warmup(optimizer, spec.warmup)


def reference_optimizer(kind: str, params: list[nn.Parameter], spec: Spec) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return Adafactor(
        params, lr=spec.lr, weight_decay=spec.weight_decay,
        scale_parameter=False, relative_step=False, warmup_init=False,
    )  # fmt: skip


class Solo:
    """A member trained alone, as ptlab trains a run today."""

    def __init__(self, kind: str, spec: Spec, params: list[torch.Tensor] | None = None) -> None:
        self.spec, self.done = spec, 0
        self.params = [nn.Parameter(p.clone()) for p in params or initial_params(spec)]
        self.optimizer = reference_optimizer(kind, self.params, spec)
        self.schedule = schedule(spec, self.optimizer)

    def run(self, steps: int) -> Solo:
        for _ in range(steps):
            for param, grad in zip(self.params, gradients(self.spec, self.done)):
                param.grad = grad
            if self.spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
            self.optimizer.step()
            self.schedule.step()
            self.done += 1
        return self


class Pack:
    """Members trained in one stack, each with its own lr scheduler (on a stand-in optimizer, as a pack
    would hold it) and its own step count."""

    def __init__(self, kind, specs, params, schedules, done, states=None) -> None:
        self.specs, self.schedules, self.done = list(specs), list(schedules), list(done)
        self.params = [
            nn.Parameter(torch.stack([member[j] for member in params])) for j in range(len(SHAPES))
        ]
        hypers = [spec.hyper(s.get_last_lr()[0]) for spec, s in zip(self.specs, self.schedules)]
        self.optimizer = STACKED[kind](self.params, hypers, states)
        self.norms: list[torch.Tensor] = []

    @classmethod
    def fresh(cls, kind: str, specs: list[Spec]) -> Pack:
        schedules = [schedule(spec, torch.optim.SGD([torch.zeros(1)], lr=spec.lr)) for spec in specs]
        return cls(kind, specs, [initial_params(spec) for spec in specs], schedules, [0] * len(specs))

    def member(self, i: int) -> list[torch.Tensor]:
        return [p.detach()[i].clone() for p in self.params]

    def run(self, steps: int) -> Pack:
        for _ in range(steps):
            grads = [gradients(spec, done) for spec, done in zip(self.specs, self.done)]
            for j, param in enumerate(self.params):
                param.grad = torch.stack([member[j] for member in grads])
            self.norms.append(self.optimizer.clip_grad_norm_())
            self.optimizer.step()
            for s in self.schedules:
                s.step()
            self.optimizer.lr = [s.get_last_lr()[0] for s in self.schedules]
            self.done = [done + 1 for done in self.done]
        return self


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_each_member_equals_its_solo_run(kind):
    pack = Pack.fresh(kind, SPECS[:4]).run(TOTAL_STEPS)
    for i, spec in enumerate(SPECS[:4]):
        assert_same(pack.member(i), Solo(kind, spec).run(TOTAL_STEPS).params)
    norms = torch.stack(pack.norms)
    assert (norms[:, 1] > 10 * SPECS[1].max_grad_norm).all()  # member 1 really was clipped, every step
    assert (norms[:, 0] > SPECS[3].max_grad_norm).all()  # member 0 would have been, unclipped as it is
    assert not (pack.params[0].detach()[1] == pack.params[0].detach()[0]).any()


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_members_leave_and_join_from_solo_state(kind):
    pack = Pack.fresh(kind, SPECS[:4]).run(8)
    joiner = Solo(kind, SPECS[4]).run(7)  # resumed at its own step 7
    kept = [0, 2, 3]
    pack = Pack(
        kind,
        [pack.specs[i] for i in kept] + [joiner.spec],
        [pack.member(i) for i in kept] + [[p.detach() for p in joiner.params]],
        [pack.schedules[i] for i in kept] + [joiner.schedule],
        [pack.done[i] for i in kept] + [joiner.done],
        [pack.optimizer.member_state(i) for i in kept] + [joiner.optimizer.state_dict()],
    ).run(TOTAL_STEPS - 8)
    assert pack.optimizer.steps.tolist() == [20, 20, 20, 19]
    for i, spec in enumerate(pack.specs):
        assert_same(pack.member(i), Solo(kind, spec).run(pack.done[i]).params)


def assert_same_state(actual: dict, expected: dict) -> None:
    """`actual` is `expected`, a solo optimizer's state_dict(), bar the scheduler's initial_lr."""
    groups = [{k: v for k, v in group.items() if k != "initial_lr"} for group in expected["param_groups"]]
    assert actual["param_groups"] == groups
    assert actual["state"].keys() == expected["state"].keys()
    for j, state in expected["state"].items():
        assert list(actual["state"][j]) == list(state)
        for key, value in state.items():
            assert type(actual["state"][j][key]) is type(value)
            if isinstance(value, torch.Tensor):
                assert actual["state"][j][key].dtype == value.dtype
                torch.testing.assert_close(actual["state"][j][key], value, rtol=0, atol=1e-6)
            else:
                assert actual["state"][j][key] == value


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_member_state_is_a_solo_checkpoint(kind):
    spec = SPECS[1]
    pack = Pack.fresh(kind, SPECS[:4]).run(6)
    state = pack.optimizer.member_state(1)
    lr = pack.schedules[1].get_last_lr()[0]
    assert pack.optimizer.members[:2] == [SPECS[0].hyper(pack.schedules[0].get_last_lr()[0]), spec.hyper(lr)]
    assert_same_state(state, Solo(kind, spec).run(6).optimizer.state_dict())
    tensors = [v for own in state["state"].values() for v in own.values() if isinstance(v, torch.Tensor)]
    assert all(
        v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in tensors
    )  # no stack views
    before_its_step = Pack.fresh(kind, SPECS[:2]).optimizer.member_state(1)
    assert before_its_step["state"] == {}  # as a solo optimizer's before its first step

    resumed = Solo(kind, spec, pack.member(1))
    resumed.optimizer.load_state_dict(state)
    resumed.schedule.load_state_dict(pack.schedules[1].state_dict())
    resumed.done = 6
    assert_same(resumed.run(6).params, Solo(kind, spec).run(12).params)


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def step_ops(kind: str, members: int) -> list[str]:
    """The ATen ops of one clipped optimizer step of a stack of `members`."""
    pack = Pack.fresh(kind, [SPECS[i % 4] for i in range(members)]).run(1)
    for param in pack.params:
        param.grad = torch.randn_like(param)
    with OpCounter() as counter:
        pack.optimizer.clip_grad_norm_()
        pack.optimizer.step()
    return counter.ops


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_a_step_costs_the_same_ops_for_8_members_as_for_1(kind):
    one = step_ops(kind, 1)
    assert len(one) > 10
    assert step_ops(kind, 8) == one
