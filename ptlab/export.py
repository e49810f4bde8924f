"""Hand a trained prompt to HuggingFace PEFT: a prompt-tuning adapter folder (`adapter_config.json`
+ `adapter_model.safetensors`) that `PeftModel.from_pretrained(base_model, folder)` loads.

Any method whose trained prompt is one fixed `[n, d]` block exports: prompt tuning (any length,
any schedule), SuperPos and Residual with their reparametrisation folded into that block. A routed
mixture (SMoP: a different prompt per input) and the encoder family (prompt after [CLS] plus a
trained classification head) have no PEFT prompt-tuning equivalent and are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptlab.config import Config
from ptlab.errors import ConfigError
from ptlab.methods import registered_methods
from ptlab.methods.base import SharedPromptMethod
from ptlab.pipeline import Pipeline

PEFT_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}


def check_exportable(config: Config) -> None:
    """A one-line reason, before any model loads, when the run's prompt has no PEFT equivalent."""
    family, label = config.backbone.family, config.method.run_label
    if family not in PEFT_TASK_TYPES:
        raise ConfigError(
            f"ptlab-export: the {family} family puts the prompt after [CLS] and trains a classification "
            "head; PEFT's prompt tuning has neither: export works for seq2seq (T5) and causal backbones"
        )
    _, method_cls = registered_methods()[config.method.name]
    if not issubclass(method_cls, SharedPromptMethod):
        raise ConfigError(
            f"ptlab-export: method {label!r} gives each input its own prompt (routed); PEFT's prompt "
            "tuning holds one fixed block: export works for prompt_tuning, superpos and residual"
        )


def export_peft(pipeline: Pipeline, out: Path) -> Path:
    """Write the adapter folder `out` for the pipeline's (trained) prompt; returns `out`."""
    check_exportable(pipeline.config)
    with torch.no_grad():
        prompt = pipeline.method.prompt().detach().float().cpu()
    try:
        from peft import PromptTuningConfig, get_peft_model
    except ImportError:
        raise ConfigError(
            "ptlab-export needs PEFT: pip install 'ptlab[export]' (or pip install peft)"
        ) from None
    config = PromptTuningConfig(
        task_type=PEFT_TASK_TYPES[pipeline.config.backbone.family],
        num_virtual_tokens=prompt.shape[0],
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,  # Lester et al.'s prompt on the input only (PEFT's seq2seq default is 2)
        base_model_name_or_path=pipeline.config.backbone.path,
    )
    model = get_peft_model(pipeline.backbone.model, config)
    model.prompt_encoder.default.embedding.weight.data.copy_(prompt)
    model.save_pretrained(str(out))
    return out
