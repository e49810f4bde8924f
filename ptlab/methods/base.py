"""The interface every prompt method implements, and the backbone facts it is built from."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import MISSING
from torch import nn


@dataclass
class MethodConfig:
    """Fields every prompt method has; each method extends it with its own schema."""

    name: str = MISSING  # the registered method (ptlab/methods/<module>.py)
    label: Optional[str] = None  # the name runs are logged under (a recipe: pt100, fpt); null: name
    # a run folder whose trained prompt (checkpoints/best) this run starts from: prompt transfer
    # between tasks (SPoT, Vu et al. 2022); the same method and shapes
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        pass

    @property
    def run_label(self) -> str:
        return self.label or self.name

    def row_layout(self) -> Tuple:
        """What shapes this run's rows in a pass: runs of one layout pad alike, so packs hold one
        (ptlab/sweep/grouping.py). An input block's width here; per-layer prefixes override it."""
        return ("input block", getattr(self, "prompt_length", None))


KeyValue = Tuple[torch.Tensor, torch.Tensor]  # one layer's prefix keys and values


@dataclass(frozen=True)
class StackShape:
    """One attention stack's key/value geometry: what a per-layer prefix must match."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass
class PromptContext:
    """What a method may know about the frozen backbone and the task when it is built."""

    input_embeddings: torch.Tensor  # [V, d], the frozen token embedding matrix
    tokenizer: object
    label_texts: List[str]  # the task's verbalizers, for label initialisation
    special_token_ids: List[int]
    # initial values come from generators seeded with `seed` (`seeded_init` for module
    # constructors), so a method starts the same whatever the run drew before
    seed: int = 0
    # the stacks that take per-layer prefixes, by name (`encoder`, `decoder`), and the one the
    # input goes through first (T5's and BERT's encoder, a causal LM's decoder)
    stacks: Dict[str, StackShape] = field(default_factory=dict)
    input_stack: str = "encoder"
    # token ids [n] -> the keys and values each stack computes for them, run alone through the
    # frozen model (per stack, one (key, value) per layer); prefix tuning's real-word init
    token_key_values: Optional[Callable[[torch.Tensor], Dict[str, List[KeyValue]]]] = None
    # the run's stream for draws while training (SMoP's router noise): its own, saved with its
    # checkpoint (ptlab/training/randomness.py); a context built outside a run gets one from `seed`
    generator: Optional[torch.Generator] = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.input_embeddings.shape[0]


@dataclass
class PromptInjection:
    """What a method puts into the frozen network for one batch: an input block, per-layer
    key/value prefixes, or both. The backbone places each where its family needs it.

    One run's injection has every position real (no masks). `stack` joins several runs' rows into
    one batch: each row's block and prefixes are padded on the left (padding first) to the widest
    run's, and the masks say which positions are real; the backbone then gives every real token the
    positions it has in its run alone (explicit position ids, or T5's real positions first)."""

    # [B or 1, n, d]: rows joined to the input embeddings (before the input; after [CLS] in BERT)
    block: Optional[torch.Tensor] = None
    # stack name -> one (key, value) per layer of the full model, each [B or 1, kv_heads, p, head_dim];
    # every token of that stack attends to them as to p earlier positions
    prefixes: Dict[str, List[KeyValue]] = field(default_factory=dict)
    block_mask: Optional[torch.Tensor] = None  # [B, n]: 1 at a row's real block positions; None: all
    prefix_masks: Dict[str, torch.Tensor] = field(default_factory=dict)  # stack -> [B, p], as block_mask

    @staticmethod
    def stack(parts: Sequence[PromptInjection], sizes: Sequence[int]) -> PromptInjection:
        """The injections of consecutive groups of `sizes` rows (one group per run) as one batch's."""
        blocks = [part.block for part in parts]
        block, block_mask = None, None
        if any(part is not None for part in blocks):
            block, block_mask = padded_on_left(blocks, sizes, dim=1)
        prefixes, prefix_masks = {}, {}
        for name in sorted({name for part in parts for name in part.prefixes}):
            layers = [part.prefixes.get(name) for part in parts]
            count = len(next(kv for kv in layers if kv is not None))
            stacked = []
            for layer in range(count):
                keys, mask = padded_on_left([None if kv is None else kv[layer][0] for kv in layers], sizes, 2)
                values, _ = padded_on_left([None if kv is None else kv[layer][1] for kv in layers], sizes, 2)
                stacked.append((keys, values))
            prefixes[name], prefix_masks[name] = stacked, mask
        return PromptInjection(block, prefixes, block_mask, prefix_masks)


def padded_on_left(
    parts: Sequence[Optional[torch.Tensor]], sizes: Sequence[int], dim: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each part ([1 or b, ...], positions along `dim`; None: no positions) expanded to its
    group's rows and padded with zeros on the left of `dim` to the widest part; with the `[B, n]`
    mask of the real positions."""
    like = next(part for part in parts if part is not None)
    width = max(0 if part is None else part.shape[dim] for part in parts)
    if all(part is not None and part.shape[dim] == width for part in parts):  # nothing to pad
        rows = torch.cat([part.expand(size, *part.shape[1:]) for part, size in zip(parts, sizes)])
        return rows, torch.ones(sum(sizes), width, dtype=torch.long, device=like.device)
    rows, masks = [], []
    for part, size in zip(parts, sizes):
        length = 0 if part is None else part.shape[dim]
        padding = list(like.shape)
        padding[0], padding[dim] = size, width - length
        pieces = [like.new_zeros(padding)]
        if part is not None:
            pieces.append(part.expand(size, *part.shape[1:]))
        rows.append(torch.cat(pieces, dim))
        masks.append(torch.cat([torch.zeros(size, width - length), torch.ones(size, length)], 1))
    return torch.cat(rows), torch.cat(masks).to(like.device, torch.long)


class PromptMethod(nn.Module):
    """Maps a batch's frozen input embeddings to a :class:`PromptInjection`.

    Most methods return a `[B, n, d]` block from `forward` (the input-block methods); deep prompt
    methods override `inject`. Subclasses hold only trainable parameters (and frozen buffers);
    `state_dict` of the module is what a checkpoint saves.
    """

    # the frozen network's dropout this method is designed for (None: either); building it with
    # the other setting logs a warning (ptlab.build), never silently changes the backbone
    backbone_dropout: Optional[bool] = None

    num_tokens: int = 0  # rows of the input block
    prefix_length: int = 0  # positions of each per-layer prefix
    prefix_stacks: Tuple[str, ...] = ()  # the stacks that get them
    # the injection is the same for every input (no routing): a causal backbone may run it once
    # per batch and reuse its key/value cache
    prompt_is_shared: bool = False
    # the PEFT adapter the trained prompt exports as (ptlab.lab.export): `prompt_tuning` (one fixed
    # block, from `prompt()`), `prefix_tuning` (the per-layer tables) or None (no PEFT equivalent)
    peft_export: Optional[str] = None

    @property
    def loss_in_one_pass(self) -> bool:
        """The training loss is one forward pass's task loss plus `extra_loss()`: a packed sweep
        computes it in the pass its members share; otherwise the member runs `training_loss` alone."""
        return True

    def forward(self, source_embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """The `[B, n, d]` input block of an input-block method."""
        raise NotImplementedError

    @property
    def prefix_positions(self) -> Dict[str, int]:
        """Positions of the per-layer prefix in each stack that gets one (what the FLOPs model reads)."""
        return {stack: self.prefix_length for stack in self.prefix_stacks}

    def inject(self, source_embeds: torch.Tensor, source_mask: torch.Tensor) -> PromptInjection:
        """What this method puts into the network for a batch (by default: the input block)."""
        return PromptInjection(block=self(source_embeds, source_mask))

    def together_key(self) -> Optional[Tuple]:
        """Runs whose methods give equal keys inject their rows' blocks together, in one set of
        tensor ops whatever their number (`inject_together`: a pack costs what one run costs);
        None: this run injects alone (per-layer prefixes, draws from the ambient stream)."""
        return None

    @classmethod
    def inject_together(cls, methods: Sequence[PromptMethod], source_embeds: torch.Tensor,
                        source_mask: torch.Tensor, run: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """The `[B, n, d]` blocks of the rows of several runs with one `together_key` (`run`: each
        row's index into `methods`, ascending; `sizes`: each run's rows), each row's what its run's
        own `inject` gives it, each draw from its run's own generator."""
        raise NotImplementedError

    def extra_loss(self) -> Optional[torch.Tensor]:
        """An auxiliary loss of the last forward pass, added to the task loss (a router's balancing loss)."""
        return None

    def training_loss(self, backbone, readout, batch, dropout=None) -> torch.Tensor:
        """The loss a training step minimises on `backbone` for the task `readout` reads out
        (`dropout`: the run's `DropoutStream`); methods that need several passes override it."""
        loss = backbone.loss(readout, self, batch, dropout)
        extra = self.extra_loss()
        return loss if extra is None else loss + extra

    def export_prompt(self) -> Dict[str, torch.Tensor]:
        """Tensors that reproduce the trained prompt without ptlab (saved as `export.safetensors`)."""
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}

    def eval_stats(self) -> Dict[str, float]:
        """Statistics gathered since the last call, logged with each evaluation under the names
        given here (SMoP: `router_prompt<i>_fraction`, `router_entropy`)."""
        return {}


class SharedPromptMethod(PromptMethod):
    """A method whose prompt is one `[n, d]` block for every input (all but routed mixtures)."""

    prompt_is_shared = True
    peft_export = "prompt_tuning"

    def prompt(self) -> torch.Tensor:
        raise NotImplementedError

    def injected_prompt(self) -> torch.Tensor:
        """The `[n, d]` prompt as a pass injects it (`prompts_of`), so that an exported or folded
        prompt gives the trained run's outputs bit for bit."""
        return prompts_of([self])[0]

    def forward(self, source_embeds: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """`prompt()` for every row: what `vmapped_prompts` maps over the stacked parameters."""
        return self.prompt().unsqueeze(0).expand(source_embeds.shape[0], -1, -1)

    def together_key(self) -> Tuple:
        return ("block", self.num_tokens)  # prompt() draws nothing: any such runs stack their blocks

    @classmethod
    def inject_together(cls, methods, source_embeds, source_mask, run, sizes) -> torch.Tensor:
        return prompts_of(methods).index_select(0, run)


def stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(tensors)`; where they are the slices of one stack's tensor in a pack
    (ptlab/training/stacks.py marks each with `stack_slice`: the tensor and its index there), that
    tensor itself, so the gradient lands there in one piece rather than in each run's parameter."""
    slices = [getattr(tensor, "stack_slice", None) for tensor in tensors]
    if all(part is not None for part in slices) and all(part[0] is slices[0][0] for part in slices):
        whole, indices = slices[0][0], [index for _, index in slices]
        if indices == list(range(len(whole))):
            return whole
        return whole.index_select(0, torch.tensor(indices, device=whole.device))
    return torch.stack(list(tensors))


def prompts_of(methods: Sequence[SharedPromptMethod]) -> torch.Tensor:
    """`[R, n, d]`: every method's prompt; those of one class and tensor shapes computed together,
    in one set of ops whatever their number (`vmap` over their stacked tensors)."""
    groups: Dict[Tuple, List[int]] = {}
    for index, method in enumerate(methods):
        shapes = tuple((name, tuple(t.shape)) for name, t in [*method.named_parameters(), *method.named_buffers()])
        groups.setdefault((type(method), shapes), []).append(index)
    blocks, order = [], []
    for indices in groups.values():
        members = [methods[index] for index in indices]
        blocks.append(vmapped_prompts(members))  # one alone too: the same bits as in any pack
        order += indices
    block = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    if order != sorted(order):
        block = block.index_select(0, torch.tensor(order, device=block.device).argsort())
    return block


def vmapped_prompts(methods: Sequence[SharedPromptMethod]) -> torch.Tensor:
    """The prompts of methods of one class and shapes: the first one's `prompt()` mapped over the
    methods' tensors stacked (gradients reach each method's own parameters). A lone method is mapped
    beside a detached twin: a batched product of one matrix takes another kernel than of several,
    and its prompt would part by rounding from the same run's in a pack."""
    first, twin = methods[0], len(methods) == 1

    def together(tensors: List[torch.Tensor]) -> torch.Tensor:
        return torch.stack([tensors[0], tensors[0].detach()]) if twin else stacked(tensors)

    params = {name: together([dict(m.named_parameters())[name] for m in methods]) for name, _ in first.named_parameters()}
    buffers = {name: together([dict(m.named_buffers())[name] for m in methods]) for name, _ in first.named_buffers()}
    probe = torch.zeros(1, 1, first.num_tokens, device=next(iter(params.values())).device)

    def prompt(own_params, own_buffers):
        return torch.func.functional_call(first, (own_params, own_buffers), (probe, probe[..., 0]))[0]

    prompts = torch.vmap(prompt)(params, buffers)
    return prompts[:1] if twin else prompts


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Module constructors (nn.Linear's default init) draw from torch's global CPU generator and
    take no generator: seed it for the constructors inside and give it back its state after, so
    the init is a function of the seed alone and no run's stream moves."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def sample_token_ids(context: PromptContext, count: int, top: Optional[int], seed: int) -> torch.Tensor:
    """`count` distinct non-special token ids, drawn from the first `top` ids (or all) with `seed`.

    SentencePiece vocabularies (T5) order ids by frequency, so `top=5000` draws from the 5,000
    most frequent tokens as Lester et al. (2021) do.
    """
    limit = context.vocab_size if top is None else min(top, context.vocab_size)
    candidates = torch.ones(limit, dtype=torch.bool)
    special = [i for i in context.special_token_ids if i < limit]
    candidates[special] = False
    pool = candidates.nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    if count <= len(pool):
        return pool[torch.randperm(len(pool), generator=generator)[:count]]
    return pool[torch.randint(len(pool), (count,), generator=generator)]
