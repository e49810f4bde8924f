"""How many runs fit in one pack (the one place for pack sizing): planned before the weights load
(from the model's config, `estimated_cap`, ptlab/sweep/plan.py) and checked after
(`auto_pack_size`, ptlab/training/job.py), by one rule (`members_fitting`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ptlab.config.schema import Config
from ptlab.model.backbone import Backbone
from ptlab.model.flops import ModelShape
from ptlab.model.loading import model_config

MAX_AUTO_PACK = 16  # the automatic pack size's ceiling: past it a step's batch is no longer small


def balanced(jobs: Sequence[int], count: int) -> List[List[int]]:
    """`jobs` in order, cut into `count` runs of lengths that differ by one at most."""
    count = max(1, min(count, len(jobs)))
    size, extra = divmod(len(jobs), count)
    cuts, start = [], 0
    for part in range(count):
        end = start + size + (1 if part < extra else 0)
        cuts.append(list(jobs[start:end]))
        start = end
    return cuts


def member_bytes(shape: ModelShape, config: Config, bytes_per_value: int) -> float:
    """An estimate of one member's training memory on top of the frozen weights: the activations
    backward keeps per layer and token (attention and FFN inputs and outputs, attention scores, in
    the model's compute dtype) and the fp32 vocabulary logits of its targets, with their gradients."""
    method = config.method
    prompt = getattr(method, "prompt_length", 0) or 0
    tokens = config.data.max_source_length + prompt + 8
    heads = max(1, shape.attn // 64)
    per_token_layer = 10 * shape.d + 3 * shape.ffn + 2 * heads * tokens
    layers = shape.encoder_layers + shape.decoder_layers
    rows = config.trainer.batch_size
    activations = rows * tokens * layers * per_token_layer * bytes_per_value
    logits = rows * 8 * shape.vocab * 4 * 2
    return float(activations + logits)


def available_bytes(device: torch.device) -> float:
    """Memory a pack may use: most of what the GPU has free, half of the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * 0.8
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 * 0.5
    return 8 * 2**30


def bytes_per_value(config: Config) -> int:
    """The frozen weights' and activations' bytes per value: bf16 autocast on a GPU, else fp32."""
    return 2 if config.hardware.device == "cuda" and config.hardware.precision == "bf16" else 4


def members_fitting(shape: ModelShape, configs: Sequence[Config], usable: float, where: str) -> Tuple[int, str]:
    """The most members that `usable` bytes should hold (at most MAX_AUTO_PACK), and the
    arithmetic behind it, for the log: the one sizing rule, before the weights load (from the
    model's config, `estimated_cap`) and after (`auto_pack_size`)."""
    need = max(member_bytes(shape, config, bytes_per_value(configs[0])) for config in configs)
    size = int(max(1, min(MAX_AUTO_PACK, usable // max(need, 1.0))))
    why = (
        f"pack_size={size}: about {need / 2**30:.2f} GiB per member (estimated) of {usable / 2**30:.1f} GiB "
        f"usable {where}, at most {MAX_AUTO_PACK}; set hydra.launcher.pack_size to choose"
    )
    return size, why


def auto_pack_size(backbone: Backbone, configs: Sequence[Config], device: torch.device) -> Tuple[int, str]:
    """A pack's size once its backbone is loaded: what fits in the memory left beside it."""
    shape = ModelShape.from_config(backbone.model.config)
    return members_fitting(shape, configs, available_bytes(device), f"on {device.type}")


def device_bytes(config: Config, workers: int) -> Optional[float]:
    """What one pack may use on this machine's device, shared by `workers` packs on the CPU; None
    when the packs run elsewhere (a cluster's nodes) or on a GPU this machine does not have."""
    if config.hardware.device == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(0).total_memory * 0.8
    return available_bytes(torch.device("cpu")) / max(1, workers)


def estimated_cap(configs: Sequence[Config], memory: Optional[float]) -> int:
    """A pack's size planned before any weights load: what fits in `memory` beside the frozen
    weights, from the model's config; MAX_AUTO_PACK when the device or the shape is unknown (each
    pack then sizes itself once its backbone is loaded, and halves if it does not fit)."""
    shape_config = model_config(configs[0].backbone) if memory is not None else None
    if shape_config is None:
        return MAX_AUTO_PACK
    shape = ModelShape.from_config(shape_config)
    usable = memory - weight_bytes(shape, bytes_per_value(configs[0]))
    return members_fitting(shape, configs, usable, "per device")[0]


def weight_bytes(shape: ModelShape, bytes_per_value: int) -> float:
    """The frozen weights' size from the model's shape: each block's attention and FFN matrices,
    decoder blocks' cross-attention, and the embedding table."""
    block = 2 * shape.d * shape.attn + 2 * shape.d * shape.kv + shape.d * shape.ffn * (shape.ffn_inputs + 1)
    cross = 2 * shape.d * shape.attn + 2 * shape.d * shape.kv
    values = (shape.encoder_layers + shape.decoder_layers) * block + shape.decoder_layers * cross
    return float((values + shape.vocab * shape.d) * bytes_per_value)
