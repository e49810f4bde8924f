"""The seq2seq family (T5): the prompt goes before the encoder input, and the decoder scores the
target tokens (teacher forcing); per-layer prefixes go into the encoder's attention
(ptlab/model/prefixes.py) and into the decoder's self-attention cache, as PEFT's prefix tuning."""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM, DynamicCache, EncoderDecoderCache

from ptlab.methods.base import PromptMethod
from ptlab.model.backbone import (
    Backbone,
    Runs,
    choice_targets,
    generation_inputs,
    real_first,
    verbalizer_scores,
    with_visible,
)
from ptlab.model.batching import Batch
from ptlab.model.families import register
from ptlab.model.flops import BatchSizes, ModelShape, block_flops, lm_head_flops
from ptlab.model.prefixes import cache_parameter, decoder_cache, pass_dtype, rows_of
from ptlab.model.readout import TaskReadout

# T5's relative attention has no position table; it was pretrained on 512 input tokens, and an
# encoder input 4 times longer is a mistake (a prompt length of 100000 would ask for 80 GB), not a plan
SEQ2SEQ_MAX_POSITIONS = 2048


@register("seq2seq")
class Seq2SeqBackbone(Backbone):
    auto_class = AutoModelForSeq2SeqLM
    peft_task_type = "SEQ_2_SEQ_LM"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache_key = cache_parameter(self.model.forward)

    def encoder_stack(self) -> nn.Module:
        return self.model.get_encoder()

    def position_limit(self) -> int:
        return SEQ2SEQ_MAX_POSITIONS  # relative positions: no table to overflow, but trained on 512

    def dropout_stack(self, module_name: str) -> str:
        return "decoder" if module_name.startswith("decoder") else "encoder"

    @classmethod
    def forward_flops(cls, shape: ModelShape, sizes: BatchSizes) -> float:
        """The encoder over the source; the decoder over the targets, with cross-attention to the
        source; the LM head on every target position."""
        source, target = sizes.source_tokens, sizes.target_tokens
        encoder = shape.encoder_layers * block_flops(shape, source, shape.ffn, cached=sizes.prefix("encoder"))
        decoder = shape.decoder_layers * block_flops(
            shape, target, shape.decoder_ffn, context=source, cached=sizes.prefix("decoder")
        )
        return sizes.rows * (encoder + decoder + lm_head_flops(shape, target))

    def prompted(self, runs: Runs, batch: Batch, at: int = 0):
        """As the base's, with each row's real positions first: T5's relative positions count
        sequence indices, so no padding may sit between a row's prefix, block and input."""
        injection, inputs_embeds, mask = super().prompted(runs, batch, at)
        if injection.block_mask is not None:
            inputs_embeds, mask = real_first(inputs_embeds, mask)
        return injection, inputs_embeds, mask

    def runs_logits(self, runs: Runs, batch: Batch) -> torch.Tensor:
        injection, inputs_embeds, mask = self.prompted(runs, batch)
        targets = batch["target_ids"]
        with self.encoder_prefixes.placed(injection, len(inputs_embeds)), self.frozen_dropout.laid_out(
            runs, batch, encoder=mask, decoder=targets != -100
        ):
            return self.decode_logits(injection, inputs_embeds, mask, targets)

    def decode_logits(self, injection, inputs_embeds, mask, targets, encoded=None) -> torch.Tensor:
        """Decoder logits for `targets` (teacher forcing; each row's verbalizers in a row of its
        own, consecutively); the loss is computed by the caller. Decoder prefixes go in as the
        decoder's self-attention cache, as PEFT's prefix tuning."""
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=targets)
        encoder_outputs = None if encoded is None else (encoded,)
        prefixes = injection.prefixes.get("decoder")
        extra = {}
        if prefixes:
            own = decoder_cache(prefixes, len(targets), pass_dtype(self.model))
            extra[self.cache_key] = EncoderDecoderCache(own, DynamicCache())
            visible = injection.prefix_masks.get("decoder")
            if visible is not None:  # the rows of several runs: each sees its own prefix only
                columns = rows_of(visible, len(targets))
                extra["decoder_attention_mask"] = with_visible(
                    torch.ones_like(targets), columns.shape[1], 0, columns
                )
        return self.model(
            inputs_embeds=None if encoded is not None else inputs_embeds,
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            **extra,
        ).logits

    def runs_scores(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """Encode once, then decode every verbalizer against the shared encoder states."""
        injection, inputs_embeds, mask = self.prompted(runs, batch)
        with self.encoder_prefixes.placed(injection, len(inputs_embeds)):
            encoder = self.model.get_encoder()
            encoded = encoder(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        targets, has = choice_targets(runs, batch)
        num_choices = has.shape[1]
        logits = self.decode_logits(
            injection,
            None,
            mask.repeat_interleave(num_choices, 0),
            targets,
            encoded=encoded.repeat_interleave(num_choices, 0),
        )
        return verbalizer_scores(logits, targets, has)

    def generate(
        self, readout: TaskReadout, method: PromptMethod, batch: Batch, max_new_tokens: int
    ) -> List[str]:
        injection, inputs_embeds, mask = generation_inputs(self, readout, method, batch)
        with self.encoder_prefixes.placed(injection, len(inputs_embeds)):
            output = self.model.generate(
                inputs_embeds=inputs_embeds, attention_mask=mask, max_new_tokens=max_new_tokens
            )
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)
