"""Frozen backbones behind one small interface, one class per family.

Each family decides where the prompt goes and how a batch becomes a loss or verbalizer scores:
- seq2seq (T5): prompt before the encoder input; the decoder scores the target tokens.
- causal (LLaMA): [prompt][source, left-padded][target]; logits only at the target positions.
- encoder (BERT): [CLS][prompt][rest]; the run's trainable linear head over pooled states.
Per-layer key/value prefixes (deep prompts) go into the stacks the method names (ptlab.model.prefixes).
The trainer only calls `loss`, `score` and `generate`; the prompt method supplies a PromptInjection.

A backbone holds only the frozen model: every call that needs a task's facts takes the run's
TaskReadout (ptlab.model.readout), so one backbone serves any number of runs. A batch may hold the
rows of several runs (ptlab.model.batching; its `run` says whose each row is, run by run): each method
injects for its own rows, `PromptInjection.stack` pads them, and the families place the padding so
that every real token has the positions it has in its run alone (`runs_logits`, `runs_scores`,
`run_losses`).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ptlab.config.schema import BackboneConfig
from ptlab.data.examples import Example
from ptlab.errors import ConfigError
from ptlab.methods.base import KeyValue, PromptContext, PromptInjection, PromptMethod, StackShape, stacked
from ptlab.model.anatomy import key_value_heads, self_attentions
from ptlab.model.batching import Batch, collate_runs, pad, rows_per_run
from ptlab.model.dropout_stream import DropoutStream
from ptlab.model.loading import load_model_and_tokenizer
from ptlab.model.prefixes import (
    EncoderPrefixSite,
    batch_of,
    cache_parameter,
    decoder_cache,
    encoder_key_values,
    pass_dtype,
    rows_of,
    selected_rows,
)
from ptlab.model.readout import RunParts, TaskReadout
from ptlab.model.run_dropout import NO_DROPOUT, FrozenDropout

Runs = Sequence[RunParts]  # the runs whose rows a batch holds, in the order of their `run` index


def with_visible(
    mask: torch.Tensor, columns: int, at: int = 0, visible: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`mask` with `columns` positions inserted before position `at`: visible, or where
    `visible` (`[B, columns]`, the rows of several runs) is 1."""
    inserted = mask.new_ones(len(mask), columns) if visible is None else visible.to(mask.dtype)
    return torch.cat([mask[:, :at], inserted, mask[:, at:]], 1)


def join(
    block: Optional[torch.Tensor],
    embeds: torch.Tensor,
    mask: torch.Tensor,
    at: int = 0,
    block_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The input embeddings and mask with the prompt block's rows inserted before position `at`
    (visible, or as `block_mask` says); unchanged without a block."""
    if block is None:
        return embeds, mask
    block = block.to(embeds.dtype).expand(len(embeds), -1, -1)
    joined = torch.cat([embeds[:, :at], block, embeds[:, at:]], 1)
    return joined, with_visible(mask, block.shape[1], at, block_mask)


def runs_injection(runs: Runs, batch: Batch, source_embeds: torch.Tensor) -> PromptInjection:
    """Several runs' injections for their rows: together where their methods can
    (`PromptMethod.together_key`, one group per key), else run by run."""
    keys = [run.method.together_key() for run in runs]
    sizes = rows_per_run(batch, len(runs))
    if any(key is None for key in keys):
        parts = []
        for run, embeds, mask in zip(runs, source_embeds.split(sizes), batch["source_mask"].split(sizes)):
            with run.draws():
                parts.append(run.method.inject(embeds, mask))
        return PromptInjection.stack(parts, sizes)
    groups = keyed_groups(runs, [True] * len(runs))
    if len(groups) == 1:
        methods = [run.method for run in runs]
        block = type(methods[0]).inject_together(methods, source_embeds, batch["source_mask"], batch["run"], sizes)
        return PromptInjection(block=block)
    return together_in_groups(runs, groups, batch, source_embeds, sizes)


def keyed_groups(runs: Runs, taking: Sequence[bool]) -> List[List[int]]:
    """The runs that take part (`taking`), grouped by their methods' `together_key`."""
    groups: Dict[Tuple, List[int]] = {}
    for index, (run, takes) in enumerate(zip(runs, taking)):
        if takes:
            groups.setdefault(run.method.together_key(), []).append(index)
    return list(groups.values())


def together_in_groups(runs: Runs, groups: List[List[int]], batch: Batch, source_embeds: torch.Tensor,
                       sizes: List[int]) -> PromptInjection:  # fmt: skip
    """The blocks of runs injecting together in several groups (a mixed pack): each group's for its
    rows, padded on the left to the widest (as `PromptInjection.stack` pads); the rows of runs in no
    group get none (masked)."""
    placed = []
    for group in groups:
        lookup = [-1] * len(runs)
        for local, index in enumerate(group):
            lookup[index] = local
        local = torch.tensor(lookup, device=batch["run"].device)[batch["run"]]
        rows = (local >= 0).nonzero().squeeze(1)
        methods = [runs[index].method for index in group]
        block = type(methods[0]).inject_together(methods, source_embeds[rows], batch["source_mask"][rows],
                                                 local[rows], [sizes[index] for index in group])  # fmt: skip
        placed.append((rows, block))
    width = max(block.shape[1] for _, block in placed)
    full = placed[0][1].new_zeros(len(source_embeds), width, placed[0][1].shape[2])
    mask = torch.zeros(len(source_embeds), width, dtype=torch.long, device=full.device)
    for rows, block in placed:
        full = full.index_copy(0, rows, F.pad(block, (0, 0, width - block.shape[1], 0)))
        mask[rows, width - block.shape[1] :] = 1
    return PromptInjection(block=full, block_mask=mask)


def real_first(embeds: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's real positions moved, in their order, in front of its padding."""
    order = torch.argsort(1 - mask, dim=1, stable=True)
    return embeds.gather(1, order.unsqueeze(-1).expand_as(embeds)), mask.gather(1, order)


def no_generation_with_decoder_prefixes(injection: PromptInjection) -> None:
    if injection.prefixes.get("decoder"):
        raise ConfigError(
            "trainer.eval_mode=generate is not available with prefixes in the decoder stack "
            "(method.stacks): use trainer.eval_mode=rank"
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` without dropout inside the block, in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# T5's relative attention has no position table; it was pretrained on 512 input tokens, and an
# encoder input 4 times longer is a mistake (a prompt length of 100000 would ask for 80 GB), not a plan
SEQ2SEQ_MAX_POSITIONS = 2048


class Backbone(nn.Module):
    """A frozen pretrained model plus the family's rules for placing a prompt."""

    family: str
    input_stack = "encoder"  # the stack the input goes through first (see PromptContext)
    pad_source_left = False
    can_share_prompt_states = False  # only the causal family can reuse a shared prompt's states
    prompt_states_per_example = False  # set by per_example_prompt_states()
    # a prefix in the input's stack occupies positions in front of the input (relative or rotary
    # positions; not BERT's absolute table, which only the input rows get)
    prefix_takes_positions = True
    targets_take_positions = False  # the target tokens are fed after the source (causal)
    reads_target_tokens = True  # logits are per target token [B, L, V] (the encoder's: per class [B, C])

    def __init__(self, cfg: BackboneConfig, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.model.requires_grad_(False)
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoder_prefixes = EncoderPrefixSite(self.model)  # a deep prompt's encoder prefixes
        # the frozen network's dropout, drawn per run (ptlab.model.run_dropout); none when it stays off
        self.frozen_dropout = FrozenDropout(self.model, self.dropout_stack) if cfg.dropout else NO_DROPOUT

    # --- what the rest of ptlab needs to know ------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def prefix_stacks(self) -> Dict[str, StackShape]:
        """The stacks that can take per-layer prefixes (none for a model type ptlab does not know)."""
        try:
            attentions = self_attentions(self.model)
        except ConfigError:
            return {}
        heads, head_dim = key_value_heads(self.model.config)
        return {name: StackShape(len(layers), heads, head_dim) for name, layers in attentions.items()}

    def readout(self, verbalizers: List[str], max_source_length: int, seed: int) -> TaskReadout:
        """A task's readout on this backbone: its verbalizers' target ids and, where the family
        needs one, a new head drawn with `seed`."""
        choice_ids = [self.tokenize_target(text) for text in verbalizers]
        return TaskReadout(verbalizers, choice_ids, max_source_length, self.new_head(len(verbalizers), seed))

    def new_head(self, num_classes: int, seed: int) -> Optional[nn.Linear]:
        """The trainable head a task's readout needs; none where the LM head scores target tokens."""
        return None

    def prompt_context(self, readout: TaskReadout, seed: int) -> PromptContext:
        return PromptContext(
            input_embeddings=self.model.get_input_embeddings().weight,
            tokenizer=self.tokenizer,
            label_texts=readout.verbalizers,
            special_token_ids=list(self.tokenizer.all_special_ids),
            seed=seed,
            stacks=self.prefix_stacks(),
            input_stack=self.input_stack,
            token_key_values=self.token_key_values,
        )

    @torch.no_grad()
    def token_key_values(self, ids: torch.Tensor) -> Dict[str, List[KeyValue]]:
        """Per stack, each layer's keys and values for the tokens `ids` run alone through the
        frozen model (in eval mode); the stacks it can compute (a bidirectional encoder's here)."""
        attentions = self_attentions(self.model).get("encoder")
        if attentions is None:
            return {}
        heads, _ = key_value_heads(self.model.config)
        encoder = self.encoder_stack()
        with eval_mode(self.model):
            layers = encoder_key_values(
                attentions, heads, lambda: encoder(input_ids=ids[None].to(self.model.device))
            )
        return {"encoder": layers}

    def encoder_stack(self) -> nn.Module:
        """The module that runs the bidirectional encoder stack on its own (BERT: the model)."""
        return self.model

    def position_limit(self) -> Optional[int]:
        """The most positions an input may take (None: no limit known)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @contextlib.contextmanager
    def per_example_prompt_states(self):
        """Run the prompt once per example even where a family could share its states (FPT's
        neuron statistics count every position of every example)."""
        previous, self.prompt_states_per_example = self.prompt_states_per_example, True
        try:
            yield
        finally:
            self.prompt_states_per_example = previous

    def train(self, mode: bool = True) -> Backbone:
        """With `backbone.dropout=false` the frozen network stays in eval mode: no dropout anywhere."""
        super().train(mode)
        self.model.train(mode and self.cfg.dropout)
        return self

    def runs_prompt_once(self, method: PromptMethod) -> bool:
        """Whether the next pass runs `method`'s prompt once per batch instead of per example."""
        return False

    # --- the frozen network's dropout, per run -------------------------------------------------
    def dropout_stack(self, module_name: str) -> str:
        """The stack whose hidden states the model's module `module_name` works on."""
        return self.input_stack

    # --- tokenization and batching ---------------------------------------------------------
    def tokenize_sources(self, readout: TaskReadout, texts: List[str]) -> List[List[int]]:
        return self.tokenizer(texts, truncation=True, max_length=readout.max_source_length)["input_ids"]

    def tokenize_target(self, text: str) -> List[int]:
        return self.tokenizer(text)["input_ids"]

    def collate(self, readout: TaskReadout, examples: List[Example]) -> Batch:
        """One run's batch."""
        return self.collate_runs([(readout, examples)])

    def collate_runs(self, parts: Sequence[Tuple[TaskReadout, List[Example]]]) -> Batch:
        """One batch of several runs' examples, run by run (ptlab.model.batching)."""
        return collate_runs(parts, self.pad_id, self.pad_source_left)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def injected(self, runs: Runs, batch: Batch, source_embeds: torch.Tensor) -> PromptInjection:
        """Each run's injection for its own rows, as one batch's (one run's as its method made it).
        Runs whose methods can inject together (`PromptMethod.together_key`) do, one group per key:
        a pack of them costs the tensor ops of one run, not one set per run."""
        if len(runs) == 1:
            with runs[0].draws():
                return runs[0].method.inject(source_embeds, batch["source_mask"])
        return runs_injection(runs, batch, source_embeds)

    def prompted(self, runs: Runs, batch: Batch, at: int = 0):
        """The runs' injection for the batch, and the input embeddings and mask with its block."""
        source_embeds = self.embed(batch["source_ids"])
        injection = self.injected(runs, batch, source_embeds)
        return (
            injection,
            *join(injection.block, source_embeds, batch["source_mask"], at, injection.block_mask),
        )

    # --- one run's batch -----------------------------------------------------------------------
    def output_logits(
        self, readout: TaskReadout, method: PromptMethod, batch: Batch, dropout: Optional[DropoutStream] = None
    ) -> torch.Tensor:
        """The logits the loss is computed from: target-token logits, or class logits (`dropout`:
        the run's place in the frozen network's dropout, for a training pass with it on)."""
        return self.runs_logits([RunParts(readout, method, dropout=dropout)], batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Token-mean cross-entropy on the gold verbalizer (as HF's `labels=` loss)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["target_ids"].flatten(), ignore_index=-100)

    def loss(
        self, readout: TaskReadout, method: PromptMethod, batch: Batch, dropout: Optional[DropoutStream] = None
    ) -> torch.Tensor:
        return self.loss_from_logits(self.output_logits(readout, method, batch, dropout), batch)

    def score(self, readout: TaskReadout, method: PromptMethod, batch: Batch) -> torch.Tensor:
        """`[B, C]` scores of each verbalizer (sum of target-token log-probabilities)."""
        return self.runs_scores([RunParts(readout, method)], batch)

    def generate(
        self, readout: TaskReadout, method: PromptMethod, batch: Batch, max_new_tokens: int
    ) -> List[str]:
        raise ConfigError(f"trainer.eval_mode=generate is not available for the {self.family} family")

    # --- the rows of several runs: the family-specific part ------------------------------------
    def runs_logits(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """Each row's logits as in its run alone: target-token logits `[B, L, V]` (L: the longest
        target), or class logits `[B, C]` (C: the most classes; -inf where a run has fewer)."""
        raise NotImplementedError

    def runs_scores(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """Each row's `[C]` verbalizer scores as in its run alone (-inf where its run has fewer)."""
        raise NotImplementedError

    def row_losses(self, logits: torch.Tensor, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed target-token loss and its token count, so that each run of a batch
        takes its token mean over its own rows, whichever rows share the batch."""
        targets = batch["target_ids"]
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
        )
        return losses.view(targets.shape).sum(1), (targets != -100).sum(1)

    def run_losses(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """`[R]`: each run's loss over its rows of the batch (its loss alone on those rows)."""
        sums, counts = self.row_losses(self.runs_logits(runs, batch), batch)
        total = sums.new_zeros(len(runs)).index_add(0, batch["run"], sums)
        return total / counts.new_zeros(len(runs)).index_add(0, batch["run"], counts)


def choice_targets(runs: Runs, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """`[B*C, L]` verbalizer token ids of each row's run, example-major, padded with -100 (C:
    the most verbalizers of a run), and the `[B, C]` mask of the verbalizers each row's run has."""
    width = max(len(run.readout.choice_ids) for run in runs)
    choices = [run.readout.choice_ids + [[]] * (width - len(run.readout.choice_ids)) for run in runs]
    table = pad([ids for run_choices in choices for ids in run_choices], -100).view(len(runs), width, -1)
    has = torch.tensor([[c < len(run.readout.choice_ids) for c in range(width)] for run in runs])
    rows = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor(rows_per_run(batch, len(runs))))
    device = batch["source_ids"].device
    return table[rows].flatten(0, 1).to(device), has[rows].to(device)


def target_logprob_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target token), ignoring -100 positions."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != -100
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)


def verbalizer_scores(logits: torch.Tensor, targets: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """`[B, C]` scores from the `[B*C, L]` verbalizer logits; -inf where a row's task has fewer
    verbalizers than the widest run of the batch (`has` false)."""
    scores = target_logprob_sums(logits, targets).view(has.shape)
    return scores.masked_fill(~has, float("-inf"))


def generation_inputs(backbone: Backbone, readout: TaskReadout, method: PromptMethod, batch: Batch):
    """The injection, embeddings and mask a generation starts from (one run; no decoder prefixes)."""
    injection, inputs_embeds, mask = backbone.prompted([RunParts(readout, method)], batch)
    no_generation_with_decoder_prefixes(injection)
    return injection, inputs_embeds, mask


class Seq2SeqBackbone(Backbone):
    family = "seq2seq"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache_key = cache_parameter(self.model.forward)

    def encoder_stack(self) -> nn.Module:
        return self.model.get_encoder()

    def position_limit(self) -> int:
        return SEQ2SEQ_MAX_POSITIONS  # relative positions: no table to overflow, but trained on 512

    def dropout_stack(self, module_name: str) -> str:
        return "decoder" if module_name.startswith("decoder") else "encoder"

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


class CausalBackbone(Backbone):
    family = "causal"
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

    def runs_prompt_once(self, method: PromptMethod) -> bool:
        wanted = self.cfg.share_prompt_states
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
            _, cache = self.states(cache, attention_mask=visible, inputs_embeds=block, position_ids=positions)
        run_of_row = batch["run"] if len(runs) > 1 else torch.zeros_like(batch["source_mask"][:, 0])
        layers = selected_rows(cache, run_of_row)
        columns = columns.index_select(0, run_of_row)
        row_prefixes = rows.prefixes.get("decoder")
        if row_prefixes:
            own = batch_of(row_prefixes, len(source_embeds), dtype)
            layers = [
                mine if theirs[0] is None else (torch.cat([mine[0], theirs[0]], 2), torch.cat([mine[1], theirs[1]], 2))
                for mine, theirs in zip(own, layers)
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


class EncoderBackbone(Backbone):
    """Encoders have no LM head here, so classes are read off each run's trainable linear head."""

    family = "encoder"
    prefix_takes_positions = False
    reads_target_tokens = False

    def new_head(self, num_classes: int, seed: int) -> nn.Linear:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Linear(self.hidden_size, num_classes)

    def tokenize_target(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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
        if self.cfg.head_pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def runs_logits(self, runs: Runs, batch: Batch) -> torch.Tensor:
        """Each row's class logits from its run's head (heads of one shape: every row through
        every head in one product, each row keeping its run's classes)."""
        heads = [run.readout.head for run in runs]
        if len(runs) > 1 and all(head.weight.shape == heads[0].weight.shape for head in heads):
            classes = heads[0].weight.shape[0]
            weight = stacked([head.weight for head in heads]).flatten(0, 1)  # [R * C, d]
            bias = stacked([head.bias for head in heads]).flatten()
            every = torch.addmm(bias, self.pooled(runs, batch).to(weight.dtype), weight.t())
            rows = torch.arange(len(every), device=every.device)
            return every.view(len(every), len(runs), classes)[rows, batch["run"]]
        pooled = self.pooled(runs, batch).split(rows_per_run(batch, len(runs)))
        logits = [run.readout.head(rows.to(run.readout.head.weight.dtype)) for run, rows in zip(runs, pooled)]
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


FAMILIES = {cls.family: cls for cls in (Seq2SeqBackbone, CausalBackbone, EncoderBackbone)}


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Load, freeze and wrap the configured backbone (task facts live in each run's readout)."""
    model, tokenizer = load_model_and_tokenizer(cfg)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(f"backbone {cfg.name!r}: its tokenizer has neither a pad nor an eos token")
    return FAMILIES[cfg.family](cfg, model, tokenizer)


def trainable_parameters(*modules: Optional[nn.Module]) -> List[nn.Parameter]:
    return [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]
