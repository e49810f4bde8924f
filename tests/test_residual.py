"""Residual prompt tuning: the reparameterisation, parameter count, and folding the MLP away."""

from __future__ import annotations

import pytest
import torch

from ptlab.methods import build_method

from helpers import build, examples


def residual(*overrides, backbone="tiny_t5"):
    return build([f"backbone={backbone}", "method=residual", "method.bottleneck=16", *overrides])


@pytest.mark.parametrize("per_token", [False, True])
def test_parameter_count(per_token):
    _, model, _, method = residual(f"method.per_token_mlp={per_token}")
    n, d, b = 10, model.hidden_size, 16
    mlp = d * b + b + b * d + d + 2 * d  # down, up, layer norm
    assert sum(p.numel() for p in method.parameters()) == n * d + (n if per_token else 1) * mlp


def test_prompt_is_p_plus_layernorm_of_the_bottleneck_mlp():
    _, _, _, method = residual()
    mlp = method.mlps[0]
    down, up, norm = mlp[0], mlp[2], mlp[3]
    p = method.prompt_embeds
    hidden = torch.relu(p @ down.weight.T + down.bias) @ up.weight.T + up.bias
    expected = p + torch.nn.functional.layer_norm(hidden, (p.shape[1],), norm.weight, norm.bias, norm.eps)
    assert torch.allclose(method.prompt(), expected, atol=1e-5)


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
def test_folded_prompt_gives_identical_outputs(backbone):
    config, model, readout, method = residual(backbone=backbone)
    model.eval()
    with torch.no_grad():
        for mlp in method.mlps:  # move away from init so the MLP matters
            for p in mlp.parameters():
                p.add_(0.1 * torch.randn_like(p))
    plain_config = build([f"backbone={backbone}", "method=prompt_tuning", "method.prompt_length=10"])[0]
    plain = build_method(plain_config.method, model.prompt_context(readout, 0))
    plain.load_state_dict(method.export_prompt())
    batch = model.collate(readout, examples(model, readout))
    with torch.no_grad():
        assert torch.equal(
            model.output_logits(readout, method, batch), model.output_logits(readout, plain, batch)
        )
