"""SMoP: Sparse Mixture of short Prompts (Choi et al., EMNLP 2023; code: jyjohnchoi/SMoP).

k short prompts of length l and a bias-free linear router over the masked mean of the frozen
input embeddings. In training the router logits are perturbed (sec. 2.3), then softmax and top-k;
each example gets its chosen prompt scaled by its gate probability, which is what trains the router.

Differences from the released code, each an option:
- `compat_batch_sum_bug=true` reproduces its top-1 broadcast, which gives every example its gate
  times the *sum of the prompts chosen in the batch*; off by default (the paper is per example).
- `routing=gumbel` samples the straight-through Gumbel top-1 in training only, with the noise on
  the log-probabilities; the released code adds it to the probabilities and also samples at
  evaluation, which makes predictions random.
- `routing=stochastic` has no router (as released): a random prompt per example in training,
  the mean of the prompts at evaluation.
- The released GaussianNoise scales by sigma twice (sigma^2 * eps * logits); identical at sigma=1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ptlab.errors import ConfigError, check_choice, check_range
from ptlab.method_stats import routing_stats
from ptlab.methods import register
from ptlab.methods.base import PromptContext, PromptMethod, stacked
from ptlab.methods.prompt_tuning import PromptTuningConfig, initial_prompt


@dataclass
class SMoPConfig(PromptTuningConfig):
    name: str = "smop"
    num_prompts: int = 4  # k
    prompt_length: int = 5  # l, tokens per prompt
    top_k: int = 1
    # learned: the router | stochastic: a random prompt in training, the mean prompt at eval,
    # plus a symmetric-KL consistency loss between two draws | gumbel: straight-through Gumbel top-1
    routing: str = "learned"
    # training-time perturbation of the router logits: gaussian (logits * (1 + sigma * eps)) | dropout | none
    perturbation: str = "gaussian"
    noise_sigma: float = 1.0
    router_dropout: float = 0.2
    # weight of k * sum_i(mean_prob_i * load_i) (an early commit of the official code used 0.01)
    load_balancing_weight: float = 0.0
    consistency_weight: float = 0.1  # routing=stochastic only (official alpha)
    compat_batch_sum_bug: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.routing", self.routing, ("learned", "stochastic", "gumbel"))
        check_choice("method.perturbation", self.perturbation, ("gaussian", "dropout", "none"))
        if self.num_prompts < 1:
            raise ConfigError(f"method.num_prompts={self.num_prompts} must be >= 1")
        if not 1 <= self.top_k <= self.num_prompts:
            raise ConfigError(
                f"method.top_k={self.top_k} must be in [1, method.num_prompts={self.num_prompts}]"
            )
        if self.routing != "learned" and self.top_k != 1:
            raise ConfigError(f"method.routing={self.routing} routes to one prompt: set method.top_k=1")
        check_range("method.noise_sigma", self.noise_sigma, 0)
        check_range("method.router_dropout", self.router_dropout, 0, 1, high_open=True)
        check_range("method.load_balancing_weight", self.load_balancing_weight, 0)
        check_range("method.consistency_weight", self.consistency_weight, 0)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, batch_size: int) -> torch.Tensor:
    """1/2 (KL(p_b || p_a) + KL(p_a || p_b)), each side against the other's detached target,
    summed over positions and divided by the batch size (the official `symmetric_KL_loss`)."""
    log_a, log_b = torch.log_softmax(logits_a.float(), -1), torch.log_softmax(logits_b.float(), -1)
    forward = F.kl_div(log_a, log_b.detach().exp(), reduction="sum")
    backward = F.kl_div(log_b, log_a.detach().exp(), reduction="sum")
    return 0.5 * (forward + backward) / batch_size


def like(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`values`, drawn on the CPU from the run's generator (a few numbers per example, the same on
    every device), as `reference`'s dtype on its device, copied without waiting for the device."""
    return values.to(reference.device, reference.dtype, non_blocking=True)


@register("smop", SMoPConfig)
class SMoP(PromptMethod):
    def __init__(self, config: SMoPConfig, context: PromptContext) -> None:
        super().__init__()
        self.config = config
        self.num_tokens = config.prompt_length
        prompts = initial_prompt(config, context, config.num_prompts * config.prompt_length)
        self.prompts = nn.Parameter(prompts.view(config.num_prompts, config.prompt_length, context.hidden_size))
        self.router = None
        if config.routing != "stochastic":  # skip_init: no default init drawn, the orthogonal one is it
            self.router = nn.utils.skip_init(nn.Linear, context.hidden_size, config.num_prompts, bias=False)
            nn.init.orthogonal_(self.router.weight, generator=torch.Generator().manual_seed(context.seed))
        self.generator = context.generator  # the run's stream: noise, Gumbel samples, random prompts
        self.register_buffer("routed_counts", torch.zeros(config.num_prompts), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros(()), persistent=False)
        self._aux_loss: Optional[torch.Tensor] = None

    def router_probs(self, source_embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """Softmax router probabilities `[B, k]` from the masked mean input embedding."""
        mask = source_mask.unsqueeze(-1).to(source_embeds.dtype)
        sentence = (source_embeds * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.router(sentence.to(self.router.weight.dtype))
        if self.training and self.config.perturbation == "gaussian":
            noise = like(torch.randn(logits.shape, generator=self.generator), logits)
            logits = logits + self.config.noise_sigma * noise * logits.detach()
        elif self.training and self.config.perturbation == "dropout":
            logits = F.dropout(logits, p=self.config.router_dropout, training=True)
        return torch.softmax(logits, dim=-1)

    def forward(self, source_embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        batch = source_embeds.shape[0]
        if self.config.routing == "stochastic":
            if not self.training:
                return self.prompts.mean(0).unsqueeze(0).expand(batch, -1, -1)
            chosen = torch.randint(self.config.num_prompts, (batch,), generator=self.generator)
            return self.prompts[chosen.to(self.prompts.device, non_blocking=True)]

        probs = self.router_probs(source_embeds, source_mask)
        if self.config.routing == "gumbel" and self.training:
            uniform = like(torch.rand(probs.shape, generator=self.generator), probs)
            soft = torch.softmax(
                torch.log(probs.clamp(min=1e-20)) - torch.log(-torch.log(uniform.clamp(min=1e-20))),
                -1,
            )
            hard = F.one_hot(soft.argmax(-1), self.config.num_prompts).to(soft.dtype)
            selection = hard - soft.detach() + soft  # forward: one-hot; backward: soft gradients
            gates, chosen = selection.max(-1, keepdim=True)
        else:
            gates, chosen = probs.topk(self.config.top_k, dim=-1)  # [B, top_k]
        self._record(probs, chosen[:, 0])
        selected = self.prompts[chosen]  # [B, top_k, l, d]
        if self.config.compat_batch_sum_bug and self.config.top_k == 1:
            return gates[:, :1, None] * selected[:, 0].sum(0, keepdim=True)
        return (gates[..., None, None] * selected).sum(1)

    def together_key(self) -> Optional[Tuple]:
        """Learned top-k routing with Gaussian noise or none: runs of one shape route their rows
        together (`inject_together`); the other variants inject run by run."""
        config = self.config
        if config.routing != "learned" or config.perturbation not in ("gaussian", "none") or config.compat_batch_sum_bug:
            return None
        if config.load_balancing_weight > 0:
            return None
        return "smop", config.num_prompts, config.prompt_length, config.top_k, config.perturbation

    @classmethod
    def inject_together(cls, methods, source_embeds, source_mask, run, sizes) -> torch.Tensor:
        """Every row routed by its run's router over its run's prompts: the routers and prompts of
        all runs side by side, each row taking its run's; each run's noise from its own
        generator at its own rows' shape (as it draws alone)."""
        first, count = methods[0], methods[0].config.num_prompts
        mask = source_mask.unsqueeze(-1).to(source_embeds.dtype)
        sentence = (source_embeds * mask).sum(1) / mask.sum(1).clamp(min=1)
        # each row through its own run's router, one product per row: a joint [B, d] x [d, R * k]
        # product would sum in an order that changes with R, and a member would part from its run alone
        weight = stacked([method.router.weight for method in methods]).index_select(0, run)  # [B, k, d]
        logits = torch.bmm(weight, sentence.to(weight.dtype).unsqueeze(-1)).squeeze(-1)
        if first.training and first.config.perturbation == "gaussian":
            noise = torch.cat([torch.randn((size, count), generator=method.generator)
                               for method, size in zip(methods, sizes)])  # fmt: skip
            sigma = like(torch.tensor([method.config.noise_sigma for method in methods]), logits)[run]
            logits = logits + sigma[:, None] * like(noise, logits) * logits.detach()
        probs = torch.softmax(logits, dim=-1)
        gates, chosen = probs.topk(first.config.top_k, dim=-1)
        record_together(methods, probs, chosen[:, 0], run)
        prompts = stacked([method.prompts for method in methods]).flatten(0, 1)  # [R * k, l, d]
        # index_select, not indexing: its gradient (index_add) sums each prompt's rows in row order
        # whatever R; indexing's (index_put with accumulate) does not
        picked = (run[:, None] * count + chosen).flatten()
        selected = prompts.index_select(0, picked).view(*chosen.shape, *prompts.shape[1:])  # [B, top_k, l, d]
        return (gates[..., None, None] * selected).sum(1)

    def _record(self, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        load = torch.bincount(chosen, minlength=self.config.num_prompts).to(probs.dtype) / len(chosen)
        if self.training:
            weight = self.config.load_balancing_weight
            self._aux_loss = (
                weight * self.config.num_prompts * (probs.mean(0) * load).sum() if weight > 0 else None
            )
        else:
            self.routed_counts += load.detach() * len(chosen)
            self.entropy_sum += -(probs * torch.log(probs.clamp(min=1e-20))).sum().detach()

    def extra_loss(self) -> Optional[torch.Tensor]:
        return self._aux_loss


    @property
    def loss_in_one_pass(self) -> bool:
        return self.config.routing != "stochastic" or self.config.consistency_weight == 0

    def training_loss(self, backbone, readout, batch, dropout=None) -> torch.Tensor:
        """Stochastic routing trains two draws against each other (official `consistency_alpha`)."""
        if self.loss_in_one_pass:
            return super().training_loss(backbone, readout, batch, dropout)
        logits_a = backbone.output_logits(readout, self, batch, dropout)
        logits_b = backbone.output_logits(readout, self, batch, dropout)
        task_loss = backbone.loss_from_logits(logits_a, batch) + backbone.loss_from_logits(logits_b, batch)
        batch_size = logits_a.shape[0]
        if backbone.reads_target_tokens:  # target-token logits: compare the scored positions only
            valid = batch["target_ids"] != -100
            logits_a, logits_b = logits_a[valid], logits_b[valid]
        return task_loss + self.config.consistency_weight * symmetric_kl(logits_a, logits_b, batch_size)

    def eval_stats(self) -> Dict[str, float]:
        """Fraction of evaluated examples routed to each prompt and the mean router entropy."""
        total = float(self.routed_counts.sum())
        if total == 0:
            return {}
        stats = routing_stats([float(c) / total for c in self.routed_counts], float(self.entropy_sum) / total)
        self.routed_counts.zero_()
        self.entropy_sum.zero_()
        return stats


def record_together(methods: Sequence[SMoP], probs: torch.Tensor, chosen: torch.Tensor, run: torch.Tensor) -> None:
    """`SMoP._record` for the rows of several runs routed together (no balancing loss: such runs
    route together only without one): each run's evaluation statistics from its own rows."""
    if methods[0].training:
        for method in methods:
            method._aux_loss = None
        return
    counts = probs.new_zeros(len(methods), probs.shape[1]).index_put_(
        (run, chosen), torch.ones_like(chosen, dtype=probs.dtype), accumulate=True
    )
    entropy = probs.new_zeros(len(methods)).index_add_(0, run, -(probs * torch.log(probs.clamp(min=1e-20))).sum(-1))
    for method, routed, spread in zip(methods, counts, entropy):
        method.routed_counts += routed
        method.entropy_sum += spread
