"""Evaluation of real SST-2 validation with SmolLM2: ptlab's rank classification vs PEFT generate."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from benchkit.common import Bench, peft_for, real_task, sharing, timed
from ptlab.training.devices import to_device
from ptlab.training.evaluate import map_sorted_batches, predict_examples

if TYPE_CHECKING:
    from ptlab.data.examples import Example
    from ptlab.methods.base import PromptMethod
    from ptlab.model.backbone import Backbone


def peft_generate_texts(
    bench: Bench,
    backbone: Backbone,
    method: PromptMethod,
    examples: list[Example],
    size: int,
    new_tokens: int,
) -> Callable[[], list[str]]:
    """PEFT generate over HF's DataCollatorWithPadding batches of `examples` (left padding), with
    `method`'s prompt copied in: a call returning each example's stripped text."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    peft = peft_for(backbone, method, method.num_tokens).to(bench.device)
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(method.prompt())
    peft.eval()
    tokenizer = backbone.tokenizer
    tokenizer.padding_side = "left"
    encoded = [{"input_ids": e.source_ids, "attention_mask": [1] * len(e.source_ids)} for e in examples]
    loader = DataLoader(encoded, batch_size=size, collate_fn=DataCollatorWithPadding(tokenizer))

    def texts():
        out_texts = []
        with torch.no_grad(), bench.autocast():
            for batch in loader:
                batch = to_device(batch, bench.device)
                out = peft.generate(**batch, max_new_tokens=new_tokens, pad_token_id=backbone.pad_id)
                new = out[:, batch["input_ids"].shape[1] :]
                out_texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out_texts

    return texts


def real_eval(bench: Bench) -> None:
    """Evaluation as users run it, on real SST-2 validation examples with SmolLM2: ptlab's
    evaluation (length-sorted batches, rank classification) vs PEFT generate + exact match over
    HF's DataCollatorWithPadding batches, the same prompt in both; also reports how often
    ptlab's generate mode and PEFT's produce the same text."""
    device, autocast, sync = bench.device, bench.autocast, bench.sync
    overrides = ["backbone=smollm2_135m", f"data.max_eval_examples={bench.args.eval_examples}"]
    config, backbone, readout, method, examples = real_task(overrides, "validation", device)
    size, new_tokens = config.trainer.eval_batch_size, 5
    theirs = peft_generate_texts(bench, backbone, method, examples, size, new_tokens)

    def ours():
        return predict_examples(backbone, readout, method, examples, size, device, autocast, "rank")

    def ours_texts():
        return map_sorted_batches(
            backbone,
            readout,
            examples,
            size,
            device,
            autocast,
            lambda batch: [text.strip() for text in backbone.generate(readout, method, batch, new_tokens)],
        )

    seconds = {"ptlab": timed(ours, sync), "peft": timed(theirs, sync)}
    seconds["ptlab_shared"] = timed(sharing(backbone, True, ours), sync)
    seconds["ptlab_per_example"] = timed(sharing(backbone, False, ours), sync)
    peft_texts, ptlab_texts = theirs(), ours_texts()
    same = sum(a == b for a, b in zip(peft_texts, ptlab_texts)) / len(examples)
    bench.results["real_eval"] = {"seconds": seconds, "examples": len(examples), "same_generated_text": same}
    rate = {k: len(examples) / v for k, v in seconds.items()}
    bench.row(
        f"smollm2_135m: SST-2 validation ({len(examples)}), eval examples/s (rank vs generate {new_tokens})",
        f"{rate['ptlab']:.1f}",
        f"{rate['peft']:.1f}",
        f"{rate['ptlab'] / rate['peft']:.2f}x",
    )
    bench.row(
        "smollm2_135m: SST-2 validation eval, prompt states shared vs per example",
        f"{seconds['ptlab_shared']:.1f} s",
        f"{seconds['ptlab_per_example']:.1f} s",
        f"{seconds['ptlab_per_example'] / seconds['ptlab_shared']:.2f}x faster",
    )
    bench.row("smollm2_135m: same generated text, ptlab generate vs PEFT generate", f"{same:.1%}", "")
