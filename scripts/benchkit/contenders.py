"""The fixed-shape contenders on one backbone: ptlab's method and PEFT prompt tuning on one batch."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from benchkit.backbones import BACKBONES
from benchkit.common import Bench, build, peft_for, train_step
from ptlab.data.examples import Example
from ptlab.model.flops import BatchSizes, ModelShape
from ptlab.training.devices import to_device

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from ptlab.model.backbone import Backbone
    from ptlab.model.readout import TaskReadout


def batch_of(backbone: Backbone, readout: TaskReadout, size: int, seq_len: int) -> dict:
    """`size` examples of exactly `seq_len` source tokens (fixed shapes for both contenders)."""
    ids = backbone.tokenize_sources(
        readout, ["sst2 sentence: " + "a moving, beautifully acted film " * 64] * size
    )
    examples = [Example(source_ids=row[:seq_len], label=i % 2) for i, row in enumerate(ids)]
    return backbone.collate(readout, examples)


def decode(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[str]:
    """Texts of generated ids; ids past the tokenizer's vocabulary (a random-init model with a
    larger vocabulary than its byte tokenizer, such as smollm2_shape) decode as padding."""
    ids = ids.masked_fill(ids >= len(tokenizer), tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@dataclass
class Setup:
    """One backbone's fixed-shape contenders on one batch: ptlab's method and PEFT prompt tuning,
    each with a training step and an evaluation call."""

    name: str
    backbone: Any
    readout: Any
    method: Any
    peft: Any
    batch: dict
    shape: ModelShape
    step_flops: float
    optimizer: torch.optim.Optimizer  # the method's
    autocast: Callable
    peft_step: Callable[[], None]
    peft_eval: Callable[[], list]

    def step_on(self, model: Backbone) -> Callable[[], None]:
        """ptlab's training step with `model` as the backbone (this one, or a compiled copy)."""
        return lambda: train_step(self.method, model, self.readout, self.batch, self.optimizer, self.autocast)

    def ours_step(self) -> None:
        train_step(self.method, self.backbone, self.readout, self.batch, self.optimizer, self.autocast)

    def ours_eval(self) -> list:
        """Rank classification of the batch in one pass."""
        with torch.no_grad(), self.autocast():
            return self.backbone.score(self.readout, self.method, self.batch).argmax(-1).tolist()


def peft_train_step(
    peft: PeftModel, backbone: Backbone, batch: dict, autocast: Callable[[], AbstractContextManager]
) -> Callable[[], None]:
    """PEFT's training step on `batch`: the model's own loss (a causal LM's on the target tokens
    only), backward, AdamW."""
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    full_ids = torch.cat([batch["source_ids"], batch["target_ids"].clamp(min=0)], 1)
    causal_labels = torch.cat([torch.full_like(batch["source_ids"], -100), batch["target_ids"]], 1)

    def step():
        with autocast():
            if backbone.family == "seq2seq":
                out = peft(
                    input_ids=batch["source_ids"],
                    attention_mask=batch["source_mask"],
                    labels=batch["target_ids"],
                )
            else:
                out = peft(input_ids=full_ids, attention_mask=torch.ones_like(full_ids), labels=causal_labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peft_generate(
    peft: PeftModel,
    backbone: Backbone,
    readout: TaskReadout,
    batch: dict,
    autocast: Callable[[], AbstractContextManager],
) -> Callable[[], list]:
    """PEFT's evaluation of `batch`: generate 5 tokens, then each text's verbalizer by exact match
    (-1: none)."""
    lookup = {text: i for i, text in enumerate(readout.verbalizers)}

    def evaluate():
        with torch.no_grad(), autocast():
            if backbone.family == "seq2seq":
                out = peft.generate(
                    input_ids=batch["source_ids"], attention_mask=batch["source_mask"], max_new_tokens=5
                )
                texts = decode(backbone.tokenizer, out)
            else:
                out = peft.generate(
                    input_ids=batch["source_ids"],
                    attention_mask=batch["source_mask"],
                    max_new_tokens=5,
                    pad_token_id=backbone.pad_id,
                )
                texts = decode(backbone.tokenizer, out[:, batch["source_ids"].shape[1] :])
            return [lookup.get(t.strip(), -1) for t in texts]

    return evaluate


def setup_backbone(bench: Bench, name: str) -> Setup:
    """Backbone `name` with ptlab's method and PEFT prompt tuning, `--prompt` tokens each, on a
    fixed batch of `--batch` x `--seq-len` tokens, and the FLOPs of a training step on it."""
    args, device = bench.args, bench.device
    pipeline = build([*BACKBONES[name], f"method.prompt_length={args.prompt}"], args.seq_len)
    backbone, method = pipeline.backbone.to(device), pipeline.method.to(device)
    readout = pipeline.readout.to(device)
    batch = to_device(batch_of(backbone, readout, args.batch, args.seq_len), device)
    shape = ModelShape.from_config(backbone.model.config)
    step_flops = backbone.train_step_flops(
        shape, BatchSizes(args.batch, args.seq_len + args.prompt, batch["target_ids"].shape[1])
    )
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    peft = peft_for(backbone, method, args.prompt).to(device)
    return Setup(
        name=name,
        backbone=backbone,
        readout=readout,
        method=method,
        peft=peft,
        batch=batch,
        shape=shape,
        step_flops=step_flops,
        optimizer=optimizer,
        autocast=bench.autocast,
        peft_step=peft_train_step(peft, backbone, batch, bench.autocast),
        peft_eval=peft_generate(peft, backbone, readout, batch, bench.autocast),
    )
