"""The causal family (LLaMA, SmolLM2): [prompt][source, left-padded][target], with logits only at
the positions that predict the target. A prompt shared by every input attends only to itself, so
its keys and values are computed once per batch where no dropout makes examples differ
(`prompt_cache`); per-layer prefixes go in as the key/value cache."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from ptlab.methods.base import KeyValue, PromptInjection, PromptMethod
from ptlab.model.backbone import (
    Backbone,
    Runs,
    choice_targets,
    eval_mode,
    generation_inputs,
    join,
    keyed_groups,
    together_in_groups,
    verbalizer_scores,
)
from ptlab.model.batching import Batch, row_runs, rows_per_run
from ptlab.model.families import register
from ptlab.model.flops import BatchSizes, ModelShape, block_flops, lm_head_flops
from ptlab.model.prefixes import batch_of, cache_parameter, decoder_cache, pass_dtype, selected_rows
from ptlab.model.readout import TaskReadout


@register("causal")
class CausalBackbone(Backbone):
    auto_class = AutoModelForCausalLM
    peft_task_type = "CAUSAL_LM"
    peft_exports = ("prompt_tuning", "prefix_tuning")  # per-layer prefixes are PEFT's past_key_values
    input_stack = "decoder"
    pad_source_left = True  # so every source ends at the same position and targets follow it
    # a prompt shared by every input sits at positions 0..n-1 and attends only to itself, so its
    # keys/values are the same for every example: computed once per batch, not B times
    can_share_prompt_states = True
    targets_take_positions = True

    def tokenize_target(self, text: str) -> List[int]:
        ids = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        return ids + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dropout_free = getattr(self.model.config, "attention_dropout", 0.0) == 0 and not any(
            isinstance(module, nn.Dropout) and module.p > 0 for module in self.model.modules()
        )
        self.cache_key = cache_parameter(self.model.base_model.forward)

    @classmethod
    def forward_flops(cls, shape: ModelShape, sizes: BatchSizes) -> float:
        """One stack over [prompt][source][target] (the last target is only predicted), the LM head
        on the target positions; a shared prompt runs once per batch and each row attends to its
        cached keys/values, as do the per-layer prefixes."""
        prefix, shared = sizes.prefix("decoder"), sizes.shared_prompt
        rest = sizes.source_tokens + sizes.target_tokens - 1 - shared
        row = shape.encoder_layers * block_flops(shape, rest, shape.ffn, cached=prefix + shared)
        once = shape.encoder_layers * block_flops(shape, shared, shape.ffn, cached=prefix)
        return sizes.rows * (row + lm_head_flops(shape, sizes.target_tokens)) + once

    def runs_prompt_once(self, method: PromptMethod) -> bool:
        wanted = self.config.share_prompt_states
        if wanted is None:  # auto: where it measured faster
            wanted = self.model.device.type == "cpu"
        return (
            wanted
            and self.can_share_prompt_states
            and not self.prompt_states_per_example
            and method.prompt_is_shared
            and (self.dropout_free or not self.model.training)
        )

    @torch.no_grad()
    def token_key_values(self, ids: torch.Tensor) -> Dict[str, List[KeyValue]]:
        """The layers' key/value cache of `ids` run alone: what a prompt of these tokens at
        positions 0..n-1 puts in every layer, since it attends only to itself."""
        with eval_mode(self.model):
            _, cache = self.states(input_ids=ids[None].to(self.model.device))
        return {"decoder": [(layer.keys.float(), layer.values.float()) for layer in cache.layers]}

    def states(self, cache=None, use_cache: bool = True, **inputs):
        """The base model's hidden states, attending to `cache` if given, and its key/value cache
        when `use_cache` (`.cache` or `.past_key_values`, whichever this transformers calls it)."""
        out = self.model.base_model(**inputs, **{self.cache_key: cache}, use_cache=use_cache)
        return out.last_hidden_state, out.get(self.cache_key)

    def fed_targets(self, targets: torch.Tensor):
        """Embeddings and mask of the target tokens that are inputs: each row's all but its last,
        which is only predicted (one position less per example than feeding the whole target; a
        row's real positions are the same whatever longer targets share its batch)."""
        fed = targets[:, :-1]
        mask = (targets[:, 1:] != -100).long()
        return self.embed(fed.clamp(min=0) * mask + self.pad_id * (1 - mask)), mask

    def run_prefix(self, runs: Runs, batch: Batch, suffix=None, suffix_mask=None, keep_cache: bool = True):
        """Hidden states and key/value cache of [prefix][block][source](+suffix), the mask of
        [prefix][block][source] and the position of its last token. Positions count each row's
        real tokens from 0 (padding, at the left of each part, takes none), so a row of several
        runs' batch has its run's own positions. A run's shared prompt is run once per batch and
        its cache given to each of its rows when no dropout makes examples differ (`prompt_cache`);
        the result equals the per-example pass."""
        cache, prefix_mask, inputs = self.prompt_cache(runs, batch, self.embed(batch["source_ids"]))
        positions = (prefix_mask.cumsum(1) - 1).clamp(min=0)
        mask = prefix_mask
        if suffix is not None:
            inputs = torch.cat([inputs, suffix], 1)
            mask = torch.cat([prefix_mask, suffix_mask], 1)
            positions = torch.cat([positions, positions[:, -1:] + suffix_mask.cumsum(1)], 1)
        with self.frozen_dropout.laid_out(runs, batch, decoder=mask[:, -inputs.shape[1] :]):
            hidden, cache = self.states(
                cache,
                keep_cache,
                inputs_embeds=inputs,
                attention_mask=mask,
                position_ids=positions[:, -inputs.shape[1] :],
            )
        return hidden, cache, prefix_mask, positions[:, prefix_mask.shape[1] - 1 : prefix_mask.shape[1]]

    def prompt_cache(
        self, runs: Runs, batch: Batch, source_embeds: torch.Tensor
    ) -> Tuple[Optional[DynamicCache], torch.Tensor, torch.Tensor]:
        """The cache each row starts from, the mask of [its columns][block][source] and the input
        embeddings. The runs whose prompt may run once (`runs_prompt_once`) have their prompts run
        together, one row per run, and each row gets its run's keys and values (a pack of R such
        runs pays R prompts per batch, not one per row); the other runs' blocks and prefixes stay
        per row. Cache columns, in order: the per-row prefixes, then the shared prefixes and
        blocks, each masked where its run is not the row's."""
        dtype = pass_dtype(self.model)
        sizes = rows_per_run(batch, len(runs))
        once = [rows > 0 and self.runs_prompt_once(run.method) for run, rows in zip(runs, sizes)]
        prompts, rows = prompts_and_rows(self, runs, batch, source_embeds, sizes, once)
        prefixes = prompts.prefixes.get("decoder")
        cache = decoder_cache(prefixes, len(runs), dtype) if prefixes else None
        columns = prompts.prefix_masks["decoder"] if prefixes else batch["source_mask"].new_zeros(len(runs), 0)
        if prompts.block is not None:
            block = prompts.block.to(source_embeds.dtype)
            columns = torch.cat([columns, prompts.block_mask.to(columns.dtype)], 1)
            positions = (columns.cumsum(1) - 1).clamp(min=0)[:, -block.shape[1] :]
            visible = None if bool(columns.all()) else columns
            if len(block) == 1 and cache is None:  # a lone prompt runs as a pair (its twin's row is never
                # selected): products of one row take other kernels than of several, and it would part
                # by rounding from the same prompt in a pack
                block, positions = block.expand(2, -1, -1), positions.expand(2, -1)
                visible = None if visible is None else visible.expand(2, -1)
            _, cache = self.states(cache, attention_mask=visible, inputs_embeds=block, position_ids=positions)
        run_of_row = row_runs(batch, len(runs))
        layers = selected_rows(cache, run_of_row)
        columns = columns.index_select(0, run_of_row)
        row_prefixes = rows.prefixes.get("decoder")
        if row_prefixes:
            own = batch_of(row_prefixes, len(source_embeds), dtype)
            layers = [  # each layer: the row's own prefix keys and values, then the shared ones (if any)
                (keys, values) if shared_keys is None
                else (torch.cat([keys, shared_keys], 2), torch.cat([values, shared_values], 2))
                for (keys, values), (shared_keys, shared_values) in zip(own, layers)
            ] if layers else own
            columns = torch.cat([rows.prefix_masks["decoder"].to(columns.dtype), columns], 1)
        inputs, source_mask = join(rows.block, source_embeds, batch["source_mask"], block_mask=rows.block_mask)
        return (DynamicCache(layers) if layers else None), torch.cat([columns, source_mask], 1), inputs

    def runs_logits(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """Logits at the positions that predict the targets only: the full-vocabulary projection
        is computed for L target tokens instead of the whole sequence."""
        targets = batch["target_ids"]
        hidden, _, _, _ = self.run_prefix(runs, batch, *self.fed_targets(targets), keep_cache=False)
        # target token j is predicted by the state before it: the source's last one for j = 0
        return self.model.get_output_embeddings()(hidden[:, -targets.shape[1] :])

    def runs_scores(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """Run [prompt][source] once and keep its key/value cache, then run every verbalizer
        against that shared prefix: C verbalizers cost C short passes, not C full ones."""
        targets, has = choice_targets(runs, batch)
        num_choices = has.shape[1]
        fed, fed_mask = self.fed_targets(targets)
        hidden, cache, prefix_mask, last_position = self.run_prefix(runs, batch, keep_cache=fed.shape[1] > 0)
        states = hidden[:, -1:].repeat_interleave(num_choices, 0)
        if fed.shape[1] > 0:
            cache.batch_repeat_interleave(num_choices)
            fed_hidden, _ = self.states(
                cache,
                False,
                inputs_embeds=fed,
                attention_mask=torch.cat([prefix_mask.repeat_interleave(num_choices, 0), fed_mask], 1),
                position_ids=last_position.repeat_interleave(num_choices, 0) + fed_mask.cumsum(1),
            )
            states = torch.cat([states, fed_hidden], 1)
        logits = self.model.get_output_embeddings()(states)
        return verbalizer_scores(logits, targets, has)

    def generate(
        self, readout: TaskReadout, method: PromptMethod, batch: Batch, max_new_tokens: int
    ) -> List[str]:
        injection, inputs_embeds, mask = generation_inputs(self, readout, method, batch)
        output = self.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
        )
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)


def prompts_and_rows(backbone: Backbone, runs: Runs, batch: Batch, source_embeds: torch.Tensor, sizes: List[int],
                     once: List[bool]) -> Tuple[PromptInjection, PromptInjection]:  # fmt: skip
    """The injections of the runs whose prompt runs once (one row per run, masked where a run's
    prompt does not), and of the others' rows (`injected`: runs of one kind together)."""
    if not any(once):
        rows = backbone.injected(runs, batch, source_embeds)
        for stack, layers in rows.prefixes.items():  # a run alone's prefixes come without masks
            rows.prefix_masks.setdefault(stack, batch["source_mask"].new_ones(len(source_embeds), layers[0][0].shape[2]))
        return PromptInjection(), rows
    if all(run.method.together_key() is not None for run in runs):
        first = torch.tensor([sum(sizes[:index]) for index in range(len(runs))], device=source_embeds.device)
        one_each = {"run": torch.arange(len(runs), device=first.device), "source_mask": batch["source_mask"][first]}
        if all(once):
            prompts = backbone.injected(runs, one_each, source_embeds[first])
            if prompts.block is not None and prompts.block_mask is None:
                prompts.block_mask = torch.ones(prompts.block.shape[:2], dtype=torch.long, device=first.device)
            return prompts, PromptInjection()
        prompts = together_in_groups(runs, keyed_groups(runs, once), one_each, source_embeds[first], [1] * len(runs))
        rows = together_in_groups(runs, keyed_groups(runs, [not o for o in once]), batch, source_embeds, sizes)
        return prompts, rows
    shared, per_row = [], []
    for run, embeds, mask, alone in zip(runs, source_embeds.split(sizes), batch["source_mask"].split(sizes), once):
        with run.draws():
            injection = run.method.inject(embeds[:1] if alone else embeds, mask[:1] if alone else mask)
        shared.append(injection if alone else PromptInjection())
        per_row.append(PromptInjection() if alone else injection)
    return PromptInjection.stack(shared, [1] * len(runs)), PromptInjection.stack(per_row, sizes)
