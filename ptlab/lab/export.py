"""Hand a trained prompt to HuggingFace PEFT: an adapter folder (`adapter_config.json`
+ `adapter_model.safetensors`) that `PeftModel.from_pretrained(base_model, folder)` loads.

Any method whose trained prompt is one fixed `[n, d]` block exports as prompt tuning: prompt
tuning (any length, any schedule), SuperPos and Residual with their reparametrisation folded into
that block. Deep prompts on a causal LM export as prefix tuning (the same per-layer keys and
values; a reparameterisation MLP folded in). A routed mixture (SMoP: a different prompt per
input), the encoder family (prompt after [CLS] plus a trained classification head) and T5 deep
prompts (PEFT's seq2seq prefix table cannot hold a distinct prefix per layer) are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptlab.config.schema import Config
from ptlab.errors import ConfigError
from ptlab.methods import registered_methods
from ptlab.model.families import FAMILIES
from ptlab.training.build import Pipeline


def check_exportable(config: Config) -> None:
    """A one-line reason, before any model loads, when the run's prompt has no PEFT equivalent."""
    family, label = config.backbone.family, config.method.run_label
    backbone_cls = FAMILIES[family].backbone
    if backbone_cls.peft_task_type is None:
        raise ConfigError(
            f"ptlab-export: the {family} family puts the prompt after [CLS] and trains a classification "
            "head; PEFT's prompt tuning has neither: export works for seq2seq (T5) and causal backbones"
        )
    method_cls = registered_methods()[config.method.name].module
    if method_cls.peft_export == "prefix_tuning":
        if "prefix_tuning" not in backbone_cls.peft_exports:
            raise ConfigError(
                f"ptlab-export: PEFT's prefix tuning on {family} models places prefixes otherwise than "
                "ptlab (T5: its table maps to decoder layers 0, 2, 4, ..., 1, 3, ...): deep prompts "
                "export for causal backbones"
            )
        return
    if method_cls.peft_export != "prompt_tuning":
        raise ConfigError(
            f"ptlab-export: method {label!r} gives each input its own prompt (routed); PEFT's prompt "
            "tuning holds one fixed block: export works for prompt_tuning, superpos and residual"
        )


def import_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "ptlab-export needs PEFT: pip install 'ptlab[export]' (or pip install peft)"
        ) from None
    return peft


def export_prefixes(pipeline: Pipeline, out: Path) -> Path:
    """A PEFT prefix-tuning adapter holding a causal LM's trained per-layer prefixes."""
    peft = import_peft()
    table = pipeline.method.export_prompt()["decoder.prefix"].float()
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=table.shape[0],
        base_model_name_or_path=pipeline.config.backbone.path,
    )
    model = peft.get_peft_model(pipeline.backbone.model, config)
    model.prompt_encoder.default.embedding.weight.data.copy_(table)
    model.save_pretrained(str(out))
    return out


def export_peft(pipeline: Pipeline, out: Path) -> Path:
    """Write the adapter folder `out` for the pipeline's (trained) prompt; returns `out`."""
    check_exportable(pipeline.config)
    if pipeline.method.peft_export == "prefix_tuning":
        return export_prefixes(pipeline, out)
    with torch.no_grad():
        prompt = pipeline.method.injected_prompt().detach().float().cpu()
    peft = import_peft()
    config = peft.PromptTuningConfig(
        task_type=pipeline.backbone.peft_task_type,
        num_virtual_tokens=prompt.shape[0],
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,  # Lester et al.'s prompt on the input only (PEFT's seq2seq default is 2)
        base_model_name_or_path=pipeline.config.backbone.path,
    )
    model = peft.get_peft_model(pipeline.backbone.model, config)
    model.prompt_encoder.default.embedding.weight.data.copy_(prompt)
    model.save_pretrained(str(out))
    return out
