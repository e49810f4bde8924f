"""Frozen backbones behind one small interface, one class per family.

Each family decides where the prompt goes and how a batch becomes a loss or verbalizer scores:
- seq2seq (T5): prompt before the encoder input; the decoder scores the target tokens.
- causal (LLaMA): [prompt][source, left-padded][target]; logits only at the target positions.
- encoder (BERT): [CLS][prompt][rest]; a trainable linear head over pooled states.
Per-layer key/value prefixes (deep prompts) go into the stacks the method names (ptlab.model.prefixes).
The trainer only calls `loss`, `score` and `generate`; the prompt method supplies a PromptInjection.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ptlab.config.schema import BackboneConfig
from ptlab.data.examples import Example
from ptlab.errors import ConfigError
from ptlab.methods.base import (
    KeyValue,
    PromptContext,
    PromptInjection,
    PromptMethod,
    SharedPromptMethod,
    StackShape,
)
from ptlab.model.anatomy import key_value_heads, self_attentions
from ptlab.model.loading import load_model_and_tokenizer
from ptlab.model.prefixes import EncoderPrefixes, cache_parameter, decoder_cache, encoder_key_values

Batch = Dict[str, torch.Tensor]


def pad(sequences: List[List[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(seq) for seq in sequences)
    rows = [
        [value] * (width - len(seq)) + seq if left else seq + [value] * (width - len(seq))
        for seq in sequences
    ]
    return torch.tensor(rows, dtype=torch.long)


def with_visible(mask: torch.Tensor, columns: int, at: int = 0) -> torch.Tensor:
    """`mask` with `columns` visible positions inserted before position `at`."""
    return torch.cat([mask[:, :at], mask.new_ones(len(mask), columns), mask[:, at:]], 1)


def join(
    block: Optional[torch.Tensor], embeds: torch.Tensor, mask: torch.Tensor, at: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The input embeddings and mask with the prompt block's rows (visible) inserted before
    position `at`; unchanged without a block."""
    if block is None:
        return embeds, mask
    block = block.to(embeds.dtype).expand(len(embeds), -1, -1)
    return torch.cat([embeds[:, :at], block, embeds[:, at:]], 1), with_visible(mask, block.shape[1], at)


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

    def __init__(
        self, cfg: BackboneConfig, model: nn.Module, tokenizer, verbalizers: List[str], max_source_length: int
    ):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.model.requires_grad_(False)
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.verbalizers = list(verbalizers)
        self.choice_ids = [self.tokenize_target(text) for text in self.verbalizers]
        self.encoder_hooks: Optional[EncoderPrefixes] = None  # installed on a deep prompt's first pass

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

    def prompt_context(self, seed: int) -> PromptContext:
        return PromptContext(
            input_embeddings=self.model.get_input_embeddings().weight,
            tokenizer=self.tokenizer,
            label_texts=self.verbalizers,
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
        encoder = self.model.get_encoder() if self.family == "seq2seq" else self.model
        with eval_mode(self.model):
            layers = encoder_key_values(
                attentions, heads, lambda: encoder(input_ids=ids[None].to(self.model.device))
            )
        return {"encoder": layers}

    def positions_taken(self, method: PromptMethod) -> int:
        """Positions the prompt occupies in front of the input: its block, and a prefix in the
        input's stack where positions are relative or rotary (not BERT's absolute table)."""
        prefix = self.family != "encoder" and self.input_stack in method.prefix_stacks
        return method.num_tokens + (method.prefix_length if prefix else 0)

    def check_fits(self, method: PromptMethod) -> None:
        """Fail early, not inside the position embeddings, when prompt + input cannot fit."""
        num_prompt_tokens = self.positions_taken(method)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if self.family == "seq2seq":  # relative positions: no table to overflow, but trained on 512
            limit = SEQ2SEQ_MAX_POSITIONS
        longest_target = max(len(ids) for ids in self.choice_ids) if self.family == "causal" else 0
        needed = self.max_source_length + num_prompt_tokens + longest_target
        if limit is not None and needed > limit:
            targets = f" + {longest_target} target tokens" if longest_target else ""
            raise ConfigError(
                f"data.max_source_length={self.max_source_length} + {num_prompt_tokens} prompt tokens{targets} = "
                f"{needed} exceeds the backbone's {limit} positions: lower method.prompt_length or data.max_source_length"
            )

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

    # --- tokenization and batching ---------------------------------------------------------
    def tokenize_sources(self, texts: List[str]) -> List[List[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_source_length)["input_ids"]

    def tokenize_target(self, text: str) -> List[int]:
        return self.tokenizer(text)["input_ids"]

    def collate(self, examples: List[Example]) -> Batch:
        source = [example.source_ids for example in examples]
        source_ids = pad(source, self.pad_id, left=self.pad_source_left)
        mask = pad([[1] * len(ids) for ids in source], 0, left=self.pad_source_left)
        labels = torch.tensor([example.label for example in examples], dtype=torch.long)
        targets = pad([self.choice_ids[example.label] for example in examples], -100)
        return {"source_ids": source_ids, "source_mask": mask, "labels": labels, "target_ids": targets}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def prompted(self, method: PromptMethod, batch: Batch, at: int = 0):
        """The method's injection for the batch, and the input embeddings and mask with its block."""
        source_embeds = self.embed(batch["source_ids"])
        injection = method.inject(source_embeds, batch["source_mask"])
        return (injection, *join(injection.block, source_embeds, batch["source_mask"], at))

    def prefix_dtype(self) -> torch.dtype:
        """The dtype of this pass's keys and values: autocast's where it is on (bf16 on a GPU), else
        the model's; prefixes are cast to it so attention sees one dtype."""
        device = self.model.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.model.dtype

    @contextlib.contextmanager
    def encoder_prefixes(self, injection: PromptInjection, size: int) -> Iterator[None]:
        """Inside this block the encoder stack attends to the injection's encoder prefixes."""
        prefixes = injection.prefixes.get("encoder")
        if not prefixes:
            yield
            return
        if self.encoder_hooks is None:
            self.encoder_hooks = EncoderPrefixes(self_attentions(self.model)["encoder"])
        with self.encoder_hooks.placed(prefixes, size, self.prefix_dtype()):
            yield

    # --- the family-specific part ----------------------------------------------------------
    def output_logits(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        """The logits the loss is computed from: target-token logits, or class logits."""
        raise NotImplementedError

    def loss_from_logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Token-mean cross-entropy on the gold verbalizer (as HF's `labels=` loss)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["target_ids"].flatten(), ignore_index=-100)

    def loss(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        return self.loss_from_logits(self.output_logits(method, batch), batch)

    def score(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        """`[B, C]` scores of each verbalizer (sum of target-token log-probabilities)."""
        raise NotImplementedError

    def generate(self, method: PromptMethod, batch: Batch, max_new_tokens: int) -> List[str]:
        raise ConfigError(f"trainer.eval_mode=generate is not available for the {self.family} family")

    def choice_targets(self, batch_size: int, device) -> torch.Tensor:
        """`[B*C, L]` verbalizer token ids, example-major, padded with -100."""
        return pad(self.choice_ids, -100).to(device).repeat(batch_size, 1)


def target_logprob_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target token), ignoring -100 positions."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != -100
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)


class Seq2SeqBackbone(Backbone):
    family = "seq2seq"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cache_key = cache_parameter(self.model.forward)

    def output_logits(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        injection, inputs_embeds, mask = self.prompted(method, batch)
        with self.encoder_prefixes(injection, len(inputs_embeds)):
            return self.decode_logits(injection, inputs_embeds, mask, batch["target_ids"])

    def decode_logits(self, injection, inputs_embeds, mask, targets, encoded=None) -> torch.Tensor:
        """Decoder logits for `targets` (teacher forcing); the loss is computed by the caller.
        Decoder prefixes go in as the decoder's self-attention cache, as PEFT's prefix tuning."""
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=targets)
        encoder_outputs = None if encoded is None else (encoded,)
        prefixes = injection.prefixes.get("decoder")
        cache_argument = {}
        if prefixes:
            own = decoder_cache(prefixes, len(targets), self.prefix_dtype())
            cache_argument[self.cache_key] = EncoderDecoderCache(own, DynamicCache())
        return self.model(
            inputs_embeds=None if encoded is not None else inputs_embeds,
            encoder_outputs=encoder_outputs,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            **cache_argument,
        ).logits

    def score(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        """Encode once, then decode every verbalizer against the shared encoder states."""
        injection, inputs_embeds, mask = self.prompted(method, batch)
        with self.encoder_prefixes(injection, len(inputs_embeds)):
            encoder = self.model.get_encoder()
            encoded = encoder(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        num_choices = len(self.choice_ids)
        targets = self.choice_targets(len(encoded), encoded.device)
        logits = self.decode_logits(
            injection,
            None,
            mask.repeat_interleave(num_choices, 0),
            targets,
            encoded=encoded.repeat_interleave(num_choices, 0),
        )
        return target_logprob_sums(logits, targets).view(len(encoded), num_choices)

    def generate(self, method: PromptMethod, batch: Batch, max_new_tokens: int) -> List[str]:
        injection, inputs_embeds, mask = self.prompted(method, batch)
        no_generation_with_decoder_prefixes(injection)
        with self.encoder_prefixes(injection, len(inputs_embeds)):
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
            and isinstance(method, SharedPromptMethod)
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
        """Embeddings and mask of the target tokens that are inputs: all but the last, which is
        only predicted (one position less per example than feeding the whole target)."""
        fed = targets[:, :-1]
        mask = (fed != -100).long()
        return self.embed(fed.clamp(min=0) * mask + self.pad_id * (1 - mask)), mask

    def run_prefix(
        self, method: PromptMethod, batch: Batch, suffix=None, suffix_mask=None, keep_cache: bool = True
    ):
        """Hidden states and key/value cache of [prompt][source](+suffix), the mask of
        [prompt][source] and the position of its last token. A shared prompt is run once (batch 1)
        and its cache repeated across the batch when no dropout makes examples differ; the result
        equals the per-example pass."""
        source_embeds = self.embed(batch["source_ids"])
        size = len(source_embeds)
        shared = self.runs_prompt_once(method)
        if shared:
            injection = PromptInjection(block=method.prompt().unsqueeze(0).to(source_embeds.dtype))
        else:
            injection = method.inject(source_embeds, batch["source_mask"])
        if shared:  # the block runs on its own below; the mask still covers it
            inputs, prefix_mask = source_embeds, with_visible(batch["source_mask"], injection.block.shape[1])
        else:
            inputs, prefix_mask = join(injection.block, source_embeds, batch["source_mask"])
        prefixes = injection.prefixes.get("decoder")
        cache = decoder_cache(prefixes, 1 if shared else size, self.prefix_dtype()) if prefixes else None
        width = prefixes[0][0].shape[2] if prefixes else 0  # the prefix: positions 0..width-1
        prefix_mask = with_visible(prefix_mask, width)
        positions = (prefix_mask.cumsum(1) - 1).clamp(min=0)
        mask = prefix_mask
        if suffix is not None:
            inputs = torch.cat([inputs, suffix], 1)
            mask = torch.cat([prefix_mask, suffix_mask], 1)
            positions = torch.cat([positions, positions[:, -1:] + suffix_mask.cumsum(1)], 1)
        if shared:
            block = injection.block
            _, cache = self.states(
                cache, inputs_embeds=block, position_ids=positions[:1, width : width + block.shape[1]]
            )
            cache.batch_repeat_interleave(size)
        hidden, cache = self.states(
            cache,
            keep_cache,
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=positions[:, -inputs.shape[1] :],
        )
        return hidden, cache, prefix_mask, positions[:, prefix_mask.shape[1] - 1 : prefix_mask.shape[1]]

    def output_logits(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        """Logits at the positions that predict the targets only: the full-vocabulary projection
        is computed for L target tokens instead of the whole sequence."""
        targets = batch["target_ids"]
        hidden, _, _, _ = self.run_prefix(method, batch, *self.fed_targets(targets), keep_cache=False)
        # target token j is predicted by the state before it: the source's last one for j = 0
        return self.model.get_output_embeddings()(hidden[:, -targets.shape[1] :])

    def score(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        """Run [prompt][source] once and keep its key/value cache, then run every verbalizer
        against that shared prefix: C verbalizers cost C short passes, not C full ones."""
        size, num_choices = len(batch["source_ids"]), len(self.choice_ids)
        targets = self.choice_targets(size, batch["source_ids"].device)
        fed, fed_mask = self.fed_targets(targets)
        hidden, cache, prefix_mask, last_position = self.run_prefix(
            method, batch, keep_cache=fed.shape[1] > 0
        )
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
        return target_logprob_sums(logits, targets).view(size, num_choices)

    def generate(self, method: PromptMethod, batch: Batch, max_new_tokens: int) -> List[str]:
        injection, inputs_embeds, mask = self.prompted(method, batch)
        no_generation_with_decoder_prefixes(injection)
        output = self.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
        )
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)


class EncoderBackbone(Backbone):
    """Encoders have no LM head here, so classes are read off a trainable linear head."""

    family = "encoder"

    def __init__(self, cfg, model, tokenizer, verbalizers, max_source_length, head_seed: int = 0):
        super().__init__(cfg, model, tokenizer, verbalizers, max_source_length)
        with torch.random.fork_rng():
            torch.manual_seed(head_seed)
            self.head = nn.Linear(self.hidden_size, len(self.verbalizers))

    def tokenize_target(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def output_logits(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        keep_first = int(
            self.tokenizer.cls_token_id is not None
            and bool((batch["source_ids"][:, 0] == self.tokenizer.cls_token_id).all())
        )
        injection, inputs_embeds, mask = self.prompted(method, batch, at=keep_first)
        with self.encoder_prefixes(injection, len(inputs_embeds)):
            hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        if self.cfg.head_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled.to(self.head.weight.dtype))

    def loss_from_logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def score(self, method: PromptMethod, batch: Batch) -> torch.Tensor:
        return torch.log_softmax(self.output_logits(method, batch).float(), dim=-1)


FAMILIES = {cls.family: cls for cls in (Seq2SeqBackbone, CausalBackbone, EncoderBackbone)}


def build_backbone(
    cfg: BackboneConfig, verbalizers: List[str], max_source_length: int, seed: int
) -> Backbone:
    """Load, freeze and wrap the configured backbone."""
    model, tokenizer = load_model_and_tokenizer(cfg)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(f"backbone {cfg.name!r}: its tokenizer has neither a pad nor an eos token")
    family_cls = FAMILIES[cfg.family]
    extra = {"head_seed": seed} if family_cls is EncoderBackbone else {}
    return family_cls(cfg, model, tokenizer, verbalizers, max_source_length, **extra)


def trainable_parameters(*modules: Optional[nn.Module]) -> List[nn.Parameter]:
    return [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]
