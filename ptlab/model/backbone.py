"""The interface every backbone family implements, and the joint-row maths the families share.

A family (one module each in ptlab/model/families/, registered by name) decides where the prompt
goes and how a batch becomes a loss or verbalizer scores: seq2seq (T5), causal (LLaMA), encoder
(BERT). Per-layer key/value prefixes (deep prompts) go into the stacks the method names
(ptlab.model.prefixes). Training calls `run_losses` (the loop, for several runs' rows) and the
method's `training_loss` (`loss`); evaluation calls `runs_scores` (`score`) and `generate`.

A backbone holds only the frozen model: every call that needs a task's facts takes the run's
TaskReadout (ptlab.model.readout), so one backbone serves any number of runs. A batch may hold the
rows of several runs (ptlab.model.batching; its `run` says whose each row is, run by run): each method
injects for its own rows (`runs_injection`: together where their methods can), `PromptInjection.stack`
pads them, and the families place the padding so that every real token has the positions it has in
its run alone (`runs_logits`, `runs_scores`, `run_losses`).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ptlab.config.schema import BackboneConfig
from ptlab.data.examples import Example
from ptlab.errors import ConfigError
from ptlab.methods.base import KeyValue, PromptContext, PromptInjection, PromptMethod, StackShape
from ptlab.model.anatomy import key_value_heads, self_attentions
from ptlab.model.batching import Batch, collate_runs, pad, row_runs, rows_per_run
from ptlab.model.dropout_stream import DropoutStream
from ptlab.model.flops import BatchSizes, ModelShape
from ptlab.model.prefixes import EncoderPrefixSite, encoder_key_values
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
        run = row_runs(batch, len(runs))
        block = type(methods[0]).inject_together(methods, source_embeds, batch["source_mask"], run, sizes)
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


class Backbone(nn.Module):
    """A frozen pretrained model plus the family's rules for placing a prompt."""

    family: str  # set by `families.register`
    auto_class: ClassVar[type]  # the transformers Auto class that loads the family's models
    peft_task_type: ClassVar[Optional[str]] = None  # PEFT's task_type for ptlab-export; None: no export
    peft_exports: ClassVar[Tuple[str, ...]] = ("prompt_tuning",)  # PEFT methods its prompts export to
    input_stack = "encoder"  # the stack the input goes through first (see PromptContext)
    pad_source_left = False
    can_share_prompt_states = False  # only the causal family can reuse a shared prompt's states
    prompt_states_per_example = False  # set by per_example_prompt_states()
    # a prefix in the input's stack occupies positions in front of the input (relative or rotary
    # positions; not BERT's absolute table, which only the input rows get)
    prefix_takes_positions = True
    targets_take_positions = False  # the target tokens are fed after the source (causal)
    reads_target_tokens = True  # logits are per target token [B, L, V] (the encoder's: per class [B, C])

    def __init__(self, config: BackboneConfig, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model.requires_grad_(False)
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoder_prefixes = EncoderPrefixSite(self.model)  # a deep prompt's encoder prefixes
        # the frozen network's dropout, drawn per run (ptlab.model.run_dropout); none when it stays off
        self.frozen_dropout = FrozenDropout(self.model, self.dropout_stack) if config.dropout else NO_DROPOUT

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
        self.model.train(mode and self.config.dropout)
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
        """Each run's injection for its own rows, as one batch's. Runs whose methods can inject
        together (`PromptMethod.together_key`) do, one group per key: a pack of them costs the
        tensor ops of one run, not one set per run. A run alone takes that path too, so a member's
        rows get the same bits as alone (a prompt expanded over rows would sum its gradient in
        another order than the pack's gather)."""
        if len(runs) == 1 and runs[0].method.together_key() is None:
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

    @classmethod
    def forward_flops(cls, shape: ModelShape, sizes: BatchSizes) -> float:
        """The analytic FLOPs of the model's forward pass on a batch (`model/flops.py` counts the
        parts: blocks, cross-attention, the LM head); how the family's stacks run them."""
        raise NotImplementedError

    @classmethod
    def train_step_flops(cls, shape: ModelShape, sizes: BatchSizes) -> float:
        """A training step's FLOPs: the forward pass and a backward pass for activation gradients
        only (the backbone's weights are frozen), 2 x forward."""
        return 2.0 * cls.forward_flops(shape, sizes)

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


def trainable_parameters(*modules: Optional[nn.Module]) -> List[nn.Parameter]:
    return [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]
