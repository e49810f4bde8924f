"""Per-layer key/value prefixes inside a frozen model's self-attention (P-tuning v2, prefix tuning).

Two placements, one per kind of stack:
- a decoder stack (a causal LM, T5's decoder) takes them as a key/value cache of n earlier
  positions, which is what HuggingFace PEFT's prefix tuning does (`decoder_cache`);
- a bidirectional stack (T5's and BERT's encoder) ignores caches, so hooks on its self-attention
  modules hand each layer a cache holding its prefix and widen the mask by n visible columns
  (`EncoderPrefixes`). T5's relative position bias then sees the prefix at positions -n..-1.
Prefixes are indexed by each attention module's own `layer_idx`, so FPT's partial models, which
keep a subset of the original blocks, give each kept layer its own prefix.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from ptlab.errors import ConfigError
from ptlab.methods.base import KeyValue, PromptInjection
from ptlab.model.anatomy import key_value_projections, self_attentions


def rows_of(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor`'s rows for a batch of `size`: one row is every row's; B rows (those of several
    runs) each repeated for size / B consecutive rows (a row's verbalizers)."""
    if len(tensor) == 1:
        return tensor.expand(size, *tensor.shape[1:])
    return tensor.repeat_interleave(size // len(tensor), 0)


def batch_of(prefixes: List[KeyValue], size: int, dtype: torch.dtype) -> List[KeyValue]:
    """Each layer's (key, value) for a batch of `size`, in the model's dtype."""
    return [(rows_of(key.to(dtype), size), rows_of(value.to(dtype), size)) for key, value in prefixes]


def decoder_cache(prefixes: List[KeyValue], size: int, dtype: torch.dtype) -> DynamicCache:
    """A decoder stack's key/value cache that holds only the prefixes."""
    return DynamicCache(batch_of(prefixes, size, dtype))


def selected_rows(cache: Optional[DynamicCache], rows: torch.Tensor) -> List[Tuple[Optional[torch.Tensor], ...]]:
    """Each layer's (key, value) of `cache` for a batch whose row i is the cache's row `rows[i]`; a
    layer the pass skipped (FPT's partial depth) stays empty, as `DynamicCache(...)` takes it."""
    if cache is None:
        return []
    return [
        (None, None) if getattr(layer, "keys", None) is None
        else (layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
        for layer in cache.layers
    ]


def widened(
    mask: Optional[torch.Tensor], width: int, visible: Optional[torch.Tensor] = None, keys: int = 0
) -> Optional[torch.Tensor]:
    """An attention mask (`[B, 1, Q, K]`, boolean or additive) with `width` key columns in front:
    visible, or where `visible` (`[B, width]`, the rows of several runs) is 1. None (everything
    visible) stays None when every column is; else it is made for `keys` input columns."""
    if visible is None:
        if mask is None:
            return None
        return F.pad(mask, (width, 0), value=True if mask.dtype == torch.bool else 0.0)
    if mask is None:
        mask = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=visible.device)
    mask = mask.expand(len(visible), *mask.shape[1:])
    columns = visible.bool()[:, None, None, :].expand(*mask.shape[:-1], width)
    if mask.dtype != torch.bool:
        columns = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(
            ~columns, torch.finfo(mask.dtype).min
        )
    return torch.cat([columns, mask], -1)


CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


def cache_parameter(forward) -> str:
    """The name `forward` takes a key/value cache under: `cache` from transformers 5.2x on,
    `past_key_values` before. A cache passed under another name would be silently dropped."""
    names = inspect.signature(forward).parameters
    found = [name for name in CACHE_NAMES if name in names]
    if not found:
        raise ConfigError(
            f"{getattr(forward, '__qualname__', forward)} takes no key/value cache (none of {list(CACHE_NAMES)}): "
            "per-layer prefixes need a transformers release whose attention layers take one"
        )
    return found[0]


class EncoderPrefixes:
    """Hooks on a bidirectional stack's self-attention modules; they do nothing outside `placed`."""

    def __init__(self, attentions: List[nn.Module]) -> None:
        self.prefixes: Optional[List[KeyValue]] = None
        self.visible: Optional[torch.Tensor] = None  # [B, n]: each row's real prefix positions
        self.calls = {}  # module -> (its forward's signature, its cache argument, its mask argument)
        for attention in attentions:
            signature = inspect.signature(attention.forward)
            mask = "mask" if "mask" in signature.parameters else "attention_mask"
            self.calls[attention] = (signature, cache_parameter(attention.forward), mask)
            attention.register_forward_pre_hook(self.before_attention, with_kwargs=True)

    @contextlib.contextmanager
    def placed(
        self, prefixes: List[KeyValue], size: int, dtype: torch.dtype, visible: Optional[torch.Tensor] = None
    ) -> Iterator[None]:
        """Every pass of the stack inside this block attends to `prefixes` ([1 or B, ...] per
        layer), where `visible` ([B, n]; None: everywhere) says so."""
        self.prefixes, self.visible = batch_of(prefixes, size, dtype), visible
        try:
            yield
        finally:
            self.prefixes, self.visible = None, None

    def before_attention(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.prefixes is None:
            return None
        key, value = self.prefixes[module.layer_idx]
        signature, cache, mask = self.calls[module]
        call = signature.bind_partial(*args, **kwargs)  # however the model passes them
        # a cache of this layer's prefix only, made for each pass: the module appends its own keys
        call.arguments[cache] = DynamicCache([(None, None)] * module.layer_idx + [(key, value)])
        keys = call.arguments["hidden_states"].shape[1]
        call.arguments[mask] = widened(call.arguments.get(mask), key.shape[2], self.visible, keys)
        return call.args, call.kwargs


def pass_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of this pass's keys and values: autocast's where it is on (bf16 on a GPU), else
    the model's; prefixes are cast to it so attention sees one dtype."""
    device = model.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.dtype


class EncoderPrefixSite:
    """A model's bidirectional stack as a place for a pass's encoder prefixes; its hooks are
    installed on the first pass that has some (a deep prompt's)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks: Optional[EncoderPrefixes] = None

    @contextlib.contextmanager
    def placed(self, injection: PromptInjection, size: int) -> Iterator[None]:
        """Inside this block the encoder stack attends to the injection's encoder prefixes."""
        prefixes = injection.prefixes.get("encoder")
        if not prefixes:
            yield
            return
        if self.hooks is None:
            self.hooks = EncoderPrefixes(self_attentions(self.model)["encoder"])
        with self.hooks.placed(prefixes, size, pass_dtype(self.model), injection.prefix_masks.get("encoder")):
            yield


@torch.no_grad()
def encoder_key_values(attentions: List[nn.Module], heads: int, run: Callable[[], object]) -> List[KeyValue]:
    """Each layer's keys and values `[1, heads, n, head_dim]` while `run()` passes n tokens through
    a bidirectional encoder (read off the key and value projections)."""
    seen: List[List[torch.Tensor]] = [[] for _ in attentions]
    hooks = []
    for layer, attention in enumerate(attentions):
        for projection in key_value_projections(attention):
            hooks.append(
                projection.register_forward_hook(lambda m, i, out, layer=layer: seen[layer].append(out))
            )
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()

    def split(states: torch.Tensor) -> torch.Tensor:
        return states.view(1, states.shape[1], heads, -1).transpose(1, 2).float()

    return [(split(key), split(value)) for key, value in seen]
