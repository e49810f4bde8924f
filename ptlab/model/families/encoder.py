"""The encoder family (BERT, MiniLM): [CLS][prompt][rest], read off each run's trainable linear head
over the pooled final states (an encoder has no LM head here)."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from ptlab.methods.base import stacked
from ptlab.model.backbone import Backbone, Runs
from ptlab.model.batching import Batch, row_runs, rows_per_run
from ptlab.model.families import register
from ptlab.model.flops import BatchSizes, ModelShape, block_flops


@register("encoder")
class EncoderBackbone(Backbone):
    """Encoders have no LM head here, so classes are read off each run's trainable linear head."""

    auto_class = AutoModel  # no PEFT export: PEFT's prompt tuning has no [CLS] placement nor class head

    prefix_takes_positions = False
    reads_target_tokens = False

    def new_head(self, num_classes: int, seed: int) -> nn.Linear:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Linear(self.hidden_size, num_classes)

    def tokenize_target(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @classmethod
    def forward_flops(cls, shape: ModelShape, sizes: BatchSizes) -> float:
        """The one stack over [CLS][prompt][rest]; the pooler and the class heads are left out, as
        an LM head's norms are (d x (d + classes) per row)."""
        return sizes.rows * shape.encoder_layers * block_flops(
            shape, sizes.source_tokens, shape.ffn, cached=sizes.prefix("encoder")
        )

    def pooled(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """`[B, d]` pooled final states of [CLS][block][source]. Position ids count each row's
        real tokens, so [CLS] is at 0 and the prompt starts at 1 as in its run alone."""
        keep_first = int(
            self.tokenizer.cls_token_id is not None
            and bool((batch["source_ids"][:, 0] == self.tokenizer.cls_token_id).all())
        )
        injection, inputs_embeds, mask = self.prompted(runs, batch, at=keep_first)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with self.encoder_prefixes.placed(injection, len(inputs_embeds)), self.frozen_dropout.laid_out(runs, batch, encoder=mask):
            hidden = self.model(
                inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions
            ).last_hidden_state
        if self.config.head_pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def runs_logits(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """Each row's class logits from its run's head, every row through its own run's head in one
        batched product. A row's logits are the same bits whatever its packmates: a joint
        `[B, d] x [d, R*C]` product would sum in an order that changes with R."""
        heads = [run.readout.head for run in runs]
        pooled = self.pooled(runs, batch)
        if all(head.weight.shape == heads[0].weight.shape for head in heads):
            run = row_runs(batch, len(runs))
            weight = stacked([head.weight for head in heads]).index_select(0, run)  # [B, C, d]
            bias = stacked([head.bias for head in heads]).index_select(0, run)  # [B, C]
            return torch.baddbmm(bias.unsqueeze(-1), weight, pooled.to(weight.dtype).unsqueeze(-1)).squeeze(-1)
        parts = pooled.split(rows_per_run(batch, len(runs)))
        logits = [run.readout.head(rows.to(run.readout.head.weight.dtype)) for run, rows in zip(runs, parts)]
        width = max(part.shape[1] for part in logits)
        return torch.cat([F.pad(part, (0, width - part.shape[1]), value=float("-inf")) for part in logits])

    def loss_from_logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def row_losses(self, logits: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each row's cross-entropy, counted once (a run's loss is the mean over its rows)."""
        return F.cross_entropy(logits.float(), batch["labels"], reduction="none"), torch.ones_like(
            batch["labels"]
        )

    def runs_scores(self, runs: Runs, batch: Batch) -> torch.Tensor:
        return torch.log_softmax(self.runs_logits(runs, batch).float(), dim=-1)
