"""Per-member AdamW and Adafactor over stacked parameters: one batched update for the whole stack.

A pack trains K runs on one frozen backbone. Runs that share a method and parameter shapes keep their
trainable tensors in stacks of shape [K, ...], member i's own parameter being ``stacked[i]``. K solo
optimizers would cost K times the kernel launches; these optimizers update every member with the same
batched ops whatever K is (no Python loop over members in a step), while each member's arithmetic stays
that of its own solo optimizer: ``torch.optim.AdamW``, or transformers' ``Adafactor`` with a manual lr,
after ``torch.nn.utils.clip_grad_norm_`` over the member's own gradients. The per-member
hyperparameters (lr, weight decay, max grad norm) and step counts are float64 tensors with a leading
member dim (float64 like the solo optimizers' Python floats), so members on different lr schedules, or
resumed at different steps, share a stack.

A member's state reads and writes as its solo optimizer's ``state_dict()``: ``member_state(i)`` is what
a solo checkpoint holds, and a stack is built from such state dicts. Members join or leave by
rebuilding the stack over the caller's re-made parameters::

    kept = [0, 2]
    states = [opt.member_state(i) for i in kept] + [solo_optimizer.state_dict()]
    opt = StackedAdamW(new_params, [opt.members[i] for i in kept] + [solo_hyper], states)

A training step, the lr written the way an lr scheduler writes a param group's after its step::

    opt.clip_grad_norm_()
    opt.step()
    opt.lr = [schedule.get_last_lr()[0] for schedule in schedules]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.optimization import Adafactor

SoloState = dict[str, Any]  # a solo optimizer's state_dict()


@dataclass(frozen=True)
class MemberHyper:
    """One member's hyperparameters: its current lr; ``max_grad_norm`` None or 0 means no clipping."""

    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float | None = None


def _member_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """``values`` [K] shaped to broadcast over ``like`` [K, ...] (a view: no kernel)."""
    return values.view(-1, *(1,) * (like.ndim - 1))


def _rms(t: Tensor) -> Tensor:
    """Adafactor's ``_rms`` of each member's slice (2-norm over sqrt(numel)), shape [K]."""
    return torch.linalg.vector_norm(t, dim=_member_dims(t)) / (math.prod(t.shape[1:]) ** 0.5)


class _StackedOptimizer(ABC):
    """Per-member hyperparameters, steps and state over one stack; subclasses hold the update rule."""

    reference: type[torch.optim.Optimizer]  # the solo optimizer whose state_dict() format is kept
    reference_kwargs: dict[str, Any] = {}

    def __init__(
        self,
        params: Sequence[Tensor],
        members: Sequence[MemberHyper],
        states: Sequence[SoloState | None] | None = None,
    ) -> None:
        """``params``: leaf tensors [K, ...]; ``states``: each member's solo ``state_dict()`` or None."""
        self.params = list(params)
        k = len(members)
        if not self.params or any(p.ndim < 2 or p.shape[0] != k for p in self.params):
            raise ValueError(f"every parameter needs shape [{k}, ...]: one slice, at least 1-D, per member")
        if len({(p.dtype, p.device) for p in self.params}) > 1:
            raise ValueError("a stack's parameters share one dtype and device")
        device, self.dtype = self.params[0].device, self.params[0].dtype
        self.steps = torch.zeros(k, dtype=torch.float64, device=device)
        self.lr = [m.lr for m in members]
        self.weight_decay = torch.tensor(
            [m.weight_decay for m in members], dtype=torch.float64, device=device
        )
        no_clip = [m.max_grad_norm or math.inf for m in members]
        self.max_grad_norm = torch.tensor(no_clip, dtype=torch.float64, device=device)
        self.state = [self._fresh_state(p) for p in self.params]
        for i, solo in enumerate(states or [None] * k):
            if solo is not None:
                self._load_member(i, solo)

    @property
    def lr(self) -> Tensor:
        """Each member's current lr [K] (float64), used by the next step."""
        return self._lr

    @lr.setter
    def lr(self, values: Tensor | Sequence[float]) -> None:
        lr = torch.as_tensor(values, dtype=torch.float64, device=self.steps.device)
        if lr.shape != self.steps.shape:
            raise ValueError(
                f"one lr per member: expected shape {tuple(self.steps.shape)}, got {tuple(lr.shape)}"
            )
        self._lr = lr

    @property
    def members(self) -> list[MemberHyper]:
        """Each member's current hyperparameters, e.g. to rebuild the stack without some members."""
        norms = [n if math.isfinite(n) else None for n in self.max_grad_norm.tolist()]
        return [MemberHyper(*h) for h in zip(self.lr.tolist(), self.weight_decay.tolist(), norms)]

    def _grads(self) -> list[Tensor]:
        if any(p.grad is None for p in self.params):
            raise RuntimeError("every stacked parameter needs a .grad before clipping or stepping")
        return [p.grad for p in self.params]

    @torch.no_grad()
    def clip_grad_norm_(self) -> Tensor:
        """Each member's gradients clipped as ``clip_grad_norm_(member_params, max_norm)`` does; returns
        the members' total gradient norms [K]. A member without clipping is multiplied by exactly 1."""
        grads = self._grads()
        # [K, params]: reducing each member's contiguous row sums in the order torch's flat vector_norm does
        norms = torch.stack([torch.linalg.vector_norm(g, dim=_member_dims(g)) for g in grads], dim=1)
        total = torch.linalg.vector_norm(norms, dim=1)
        max_norm = self.max_grad_norm.to(self.dtype)
        # torch's `max_norm / (total + 1e-6)` with a float max_norm is Tensor.__rtruediv__: reciprocal, times
        coef = torch.clamp((total + 1e-6).reciprocal() * max_norm, max=1.0)
        coef = torch.where(max_norm.isinf(), 1.0, coef)  # no clipping even where a total norm is inf
        torch._foreach_mul_(grads, [_per_member(coef, g) for g in grads])
        return total

    @torch.no_grad()
    def step(self) -> None:
        """One update of every member, each at its own step count, lr and weight decay."""
        grads = self._grads()
        self.steps += 1
        self._update(grads)

    def member_state(self, i: int) -> SoloState:
        """Member i's state as its solo optimizer's ``state_dict()`` (copies, not views of the stack)."""
        step = self.steps[i].item()
        per_param = {
            j: {"step": self._solo_step(step), **{key: value[i].clone() for key, value in state.items()}}
            for j, state in enumerate(self.state)
        }
        solo = self.reference(
            [torch.empty(0)], lr=self.lr[i].item(), weight_decay=self.weight_decay[i].item(),
            **self.reference_kwargs,
        )  # fmt: skip
        group = {**solo.defaults, "params": list(range(len(self.params)))}
        return {"state": per_param if step else {}, "param_groups": [group]}

    def _load_member(self, i: int, solo: SoloState) -> None:
        """Member i's slices and step from its solo ``state_dict()`` (one that never stepped is empty)."""
        per_param = solo["state"]
        if not per_param:
            return
        if len(per_param) != len(self.params):
            raise ValueError(
                f"member {i}'s state has {len(per_param)} parameters, the stack {len(self.params)}"
            )
        for j, stacked in enumerate(self.state):
            own = per_param[j]
            if set(own) != {"step", *stacked}:
                raise ValueError(
                    f"member {i}'s parameter {j} has state {sorted(own)}, expected {sorted(stacked)}"
                )
            for key, value in stacked.items():
                tensor = torch.as_tensor(own[key])
                if tensor.shape != value.shape[1:]:
                    raise ValueError(f"member {i}'s {key} of parameter {j} has shape {tuple(tensor.shape)}")
                value[i].copy_(tensor)
        self.steps[i] = float(per_param[0]["step"])

    @abstractmethod
    def _fresh_state(self, param: Tensor) -> dict[str, Tensor]:
        """Zero state for a stacked parameter, each value [K, ...]."""

    @staticmethod
    @abstractmethod
    def _solo_step(step: float) -> Any:
        """A step count as the solo optimizer's state holds it."""

    @abstractmethod
    def _update(self, grads: list[Tensor]) -> None:
        """The update of every member, ``self.steps`` already counting it."""


class StackedAdamW(_StackedOptimizer):
    """``torch.optim.AdamW(params, lr=lr_i, weight_decay=wd_i)`` (default betas, eps; no amsgrad) per
    member, the arithmetic of torch's single-tensor/foreach AdamW (not the fused kernel)."""

    reference = torch.optim.AdamW
    betas = (0.9, 0.999)
    eps = 1e-8

    def _fresh_state(self, param: Tensor) -> dict[str, Tensor]:
        zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
        return {"exp_avg": zeros, "exp_avg_sq": zeros.clone()}

    @staticmethod
    def _solo_step(step: float) -> Tensor:
        return torch.tensor(step, dtype=torch.float32)

    def _update(self, grads: list[Tensor]) -> None:
        """torch.optim.adam's _single_tensor_adam with decoupled weight decay, batched over members."""
        beta1, beta2 = self.betas
        params = self.params
        exp_avgs = [state["exp_avg"] for state in self.state]
        exp_avg_sqs = [state["exp_avg_sq"] for state in self.state]
        # the Python-float scalars of torch's loop, computed in float64 and rounded to the stack's dtype
        decay = (1 - self.lr * self.weight_decay).to(self.dtype)
        neg_step_size = (-self.lr / (1 - beta1**self.steps)).to(self.dtype)
        bias_correction2_sqrt = ((1 - beta2**self.steps) ** 0.5).to(self.dtype)

        torch._foreach_mul_(params, [_per_member(decay, p) for p in params])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [_per_member(bias_correction2_sqrt, d) for d in denoms])
        torch._foreach_add_(denoms, self.eps)
        # param.addcdiv_(exp_avg, denom, value=-step_size) computes (value * exp_avg) / denom, then adds
        updates = torch._foreach_mul(exp_avgs, [_per_member(neg_step_size, e) for e in exp_avgs])
        torch._foreach_div_(updates, denoms)
        torch._foreach_add_(params, updates)


class StackedAdafactor(_StackedOptimizer):
    """transformers' ``Adafactor(params, lr=lr_i, weight_decay=wd_i, scale_parameter=False,
    relative_step=False, warmup_init=False)`` per member: a manual lr, no first moment (beta1=None)."""

    reference = Adafactor
    reference_kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    eps = 1e-30  # Adafactor's eps[0]; eps[1] only scales a relative step or a parameter-scaled lr
    clip_threshold = 1.0
    decay_rate = -0.8

    def _fresh_state(self, param: Tensor) -> dict[str, Tensor]:
        """Factored second moments for a member's >= 2-D parameter (row/col over its last two dims)."""
        if param.dtype in (torch.float16, torch.bfloat16):
            raise ValueError("Adafactor keeps a half-precision parameter in float32: stack it in float32")
        rms = param.new_zeros(param.shape[:1])  # the solo state dict's "RMS"; unused with a manual lr
        if param.ndim > 2:
            row = param.new_zeros(param.shape[:-1])
            col = param.new_zeros(param.shape[:-2] + param.shape[-1:])
            return {"exp_avg_sq_row": row, "exp_avg_sq_col": col, "RMS": rms}
        return {"exp_avg_sq": torch.zeros_like(param), "RMS": rms}

    @staticmethod
    def _solo_step(step: float) -> int:
        return int(step)

    def _update(self, grads: list[Tensor]) -> None:
        beta2t = 1.0 - self.steps**self.decay_rate
        # the Python-float scalars of Adafactor.step, computed in float64 and rounded to the stack's dtype
        scalars = [v.to(self.dtype) for v in (beta2t, 1.0 - beta2t, self.lr, -self.weight_decay * self.lr)]
        for param, grad, state in zip(self.params, grads, self.state):
            self._update_param(param, grad, state, *scalars)

    def _update_param(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor],
        beta2t: Tensor, one_minus_beta2t: Tensor, lr: Tensor, decay: Tensor,
    ) -> None:  # fmt: skip
        """Adafactor.step's body for one stacked parameter, each [K] scalar broadcast over its member's
        slice; reductions stay within a member. ``x.addcmul_(y, a)`` rounds as Adafactor's
        ``x.add_(y, alpha=a)`` does (one fused multiply-add), where ``x + y * a`` would round twice."""
        state["RMS"] = _rms(param)
        update = (grad**2) + self.eps
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(_per_member(beta2t, row)).addcmul_(
                update.mean(dim=-1), _per_member(one_minus_beta2t, row)
            )
            col.mul_(_per_member(beta2t, col)).addcmul_(
                update.mean(dim=-2), _per_member(one_minus_beta2t, col)
            )
            # its row.mean(dim=-1) and col.unsqueeze(-2) stay within a member: reused as it is
            update = Adafactor._approx_sq_grad(row, col)
            update.mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(_per_member(beta2t, grad)).addcmul_(update, _per_member(one_minus_beta2t, grad))
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_(_per_member((_rms(update) / self.clip_threshold).clamp_(min=1.0), update))
        update.mul_(_per_member(lr, update))
        param.addcmul_(param, _per_member(decay, param))
        param.sub_(update)
