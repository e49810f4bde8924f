"""A pack's runs as stacks: the members that share a method, its parameter shapes and an optimizer
keep their trainable tensors as slices of `[K, ...]` tensors, and one optimizer step, one
gradient clipping and one gradient gather serve them all (ptlab/training/stacked_optim.py: each
member's arithmetic is that of its own AdamW or Adafactor, its own lr, weight decay, clip norm and
step count). Those cost the same kernels for 8 members as for 1.

Each member's `nn.Parameter`s stay its own objects (its method and readout use them as always);
their storage is its slice of the stack's tensor, so the stack's in-place update is the member's.
A pass over several members takes the stack's tensor itself where it would stack their parameters
(`ptlab.methods.base.stacked`, through `stack_slice`), so their gradient lands there in one piece;
gradients a run's own pass leaves in its parameters are gathered with one `torch.stack`. Its own
torch optimizer stays the record of its state in a solo run's format: its lr schedule writes the lr
there, and its state is written back there before a checkpoint and when it leaves (`sync`). A member
that leaves (finished, failed, stopped) takes its slices with it and the others' slices and
optimizer state are carried over unchanged into a stack without it; a resumed member joins from its
own optimizer's state, at its own step.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Tuple

import torch
from torch import nn

from ptlab.config.schema import TrainerConfig
from ptlab.training.stacked_optim import MemberHyper, StackedAdafactor, StackedAdamW

STACKED_OPTIMIZERS = {"adamw": StackedAdamW, "adafactor": StackedAdafactor}


class Trainer(Protocol):
    """What a stack needs of a run's trainer (ptlab/training/trainer.py)."""

    config: TrainerConfig
    method: nn.Module
    params: List[nn.Parameter]
    optimizer: torch.optim.Optimizer
    stack: Optional[Stack]


def stack_key(trainer: Trainer) -> Tuple:
    """What members of one stack share: the method's class, the optimizer, every trainable
    tensor's shape, dtype and device."""
    shapes = tuple((tuple(p.shape), p.dtype, str(p.device)) for p in trainer.params)
    return type(trainer.method).__name__, trainer.config.optimizer, shapes


class Stack:
    """Members of a pack with one `stack_key`: their parameters' storage and their optimizer."""

    def __init__(self, trainers: List[Trainer], states: Optional[List[Dict]] = None) -> None:
        """`states`: the members' optimizer states in a solo run's format (default: their own
        optimizers')."""
        self.trainers = list(trainers)
        count = len(trainers[0].params)
        with torch.no_grad():
            self.tensors = [torch.stack([t.params[j].detach() for t in self.trainers]).requires_grad_()
                            for j in range(count)]  # fmt: skip
        for index, trainer in enumerate(self.trainers):
            for param, tensor in zip(trainer.params, self.tensors):
                param.data = tensor[index]
                param.stack_slice = (tensor, index)  # a pass over several members takes the tensor
            # it steps through this stack now: torch's LRScheduler checks this flag, else warns
            trainer.optimizer._opt_called = True
        hypers = [MemberHyper(t.optimizer.param_groups[0]["lr"], t.config.weight_decay, t.config.grad_clip)
                  for t in self.trainers]  # fmt: skip
        states = states or [t.optimizer.state_dict() for t in self.trainers]
        self.optimizer = STACKED_OPTIMIZERS[trainers[0].config.optimizer](self.tensors, hypers, states)
        self.clips = any(t.config.grad_clip for t in self.trainers)

    def step(self) -> None:
        """Every member's optimizer step on its gradients (after clipping them per member, where its
        config clips), each at its lr of now. A pass over several members leaves their gradients in
        the stack's tensors (`methods.base.stacked`), a run's own pass in its parameters: both count."""
        for j, tensor in enumerate(self.tensors):
            grads = [t.params[j].grad for t in self.trainers]
            if any(grad is not None for grad in grads):
                own = torch.stack([torch.zeros_like(t.params[j]) if g is None else g
                                   for t, g in zip(self.trainers, grads)])  # fmt: skip
                tensor.grad = own if tensor.grad is None else tensor.grad + own
            elif tensor.grad is None:
                tensor.grad = torch.zeros_like(tensor)
        self.optimizer.lr = [t.optimizer.param_groups[0]["lr"] for t in self.trainers]
        if self.clips:
            self.optimizer.clip_grad_norm_()
        self.optimizer.step()
        for tensor in self.tensors:
            tensor.grad = None

    def sync(self, trainer: Trainer) -> None:
        """The member's optimizer state written into its own torch optimizer (a solo run's format);
        its param groups keep what its lr schedule wrote there (the lr of its next step)."""
        groups = [{k: v for k, v in group.items() if k != "params"} for group in trainer.optimizer.param_groups]
        trainer.optimizer.load_state_dict(self.optimizer.member_state(self.trainers.index(trainer)))
        for group, kept in zip(trainer.optimizer.param_groups, groups):
            group.update(kept)

    def without(self, trainer: Trainer) -> Tuple[List[Trainer], List[Dict]]:
        """`trainer` leaves: its state synced, its parameters given storage of their own; the members
        that stay and their optimizer states (to be stacked again)."""
        self.sync(trainer)
        with torch.no_grad():
            for param in trainer.params:
                param.data = param.data.clone()
                del param.stack_slice
        staying = [index for index, other in enumerate(self.trainers) if other is not trainer]
        return [self.trainers[i] for i in staying], [self.optimizer.member_state(i) for i in staying]


def stacked(trainers: List[Trainer]) -> List[Stack]:
    """The stacks the trainers' next step updates: each trainer's, one made for a trainer that has
    none yet (its run stepped outside a pack), each stack once."""
    stacks: List[Stack] = []
    for trainer in trainers:
        if trainer.stack is None:
            trainer.stack = Stack([trainer])
        if all(trainer.stack is not known for known in stacks):
            stacks.append(trainer.stack)
    return stacks


class Stacks:
    """A pack's members in stacks; members leave as they end, and join as slots free."""

    def __init__(self, trainers: List[Trainer]) -> None:
        groups: Dict[Tuple, List[Trainer]] = {}
        for trainer in trainers:
            groups.setdefault(stack_key(trainer), []).append(trainer)
        self.stacks = [Stack(group) for group in groups.values()]
        for stack in self.stacks:
            for trainer in stack.trainers:
                trainer.stack = stack

    def join(self, trainer: Trainer) -> None:
        """`trainer` (a run that joins a running pack) joins the stack of its `stack_key`, a new one
        if there is none: the members' values and optimizer states carried over unchanged, its own
        from its optimizer (fresh, or as its checkpoint left it)."""
        key = stack_key(trainer)
        stack = next((stack for stack in self.stacks if stack_key(stack.trainers[0]) == key), None)
        members, states = [], []
        if stack is not None:
            members = stack.trainers
            states = [stack.optimizer.member_state(i) for i in range(len(members))]
            self.stacks.remove(stack)
        joined = Stack(members + [trainer], states + [trainer.optimizer.state_dict()])
        self.stacks.append(joined)
        for member in joined.trainers:
            member.stack = joined

    def leave(self, trainer: Trainer) -> None:
        """`trainer` leaves its stack; the others of that stack form a new one."""
        stack = trainer.stack
        if stack is None or stack not in self.stacks:
            return
        staying, states = stack.without(trainer)
        trainer.stack = None
        self.stacks.remove(stack)
        if staying:
            self.stacks.append(Stack(staying, states))
            for other in staying:
                other.stack = self.stacks[-1]
