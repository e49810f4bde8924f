"""SMoP: parameter count, routing against a hand computation, per-example routing, noise, gradients."""

from __future__ import annotations

import pytest
import torch

from ptlab.methods.smop import symmetric_kl
from ptlab.model.dropout_stream import DropoutStream

from helpers import build, examples

K, L = 4, 5


def smop(*overrides, backbone="tiny_t5"):
    return build([f"backbone={backbone}", "method=smop", *overrides])


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_llama", "tiny_bert"])
def test_parameter_count_is_k_l_d_plus_k_d(backbone):
    _, model, _, method = smop(backbone=backbone)
    d = model.hidden_size
    assert sum(p.numel() for p in method.parameters()) == K * L * d + K * d
    assert method.router.bias is None


def test_t5_base_count_matches_the_paper():
    assert 4 * 5 * 768 + 4 * 768 == 18_432  # methods.md: T5-base SMoP 4x5


def test_router_is_orthogonally_initialised():
    _, _, _, method = smop()
    w = method.router.weight
    assert torch.allclose(w @ w.T, torch.eye(K), atol=1e-5)


def hand_routing(method, embeds, mask):
    """Independent re-computation: masked mean -> W x -> softmax -> argmax -> g * P[argmax]."""
    out = []
    for b in range(len(embeds)):
        real = embeds[b][mask[b].bool()]
        x = real.mean(0) if len(real) else torch.zeros(embeds.shape[-1])
        probs = torch.softmax(method.router.weight @ x, -1)
        best = int(probs.argmax())
        out.append(probs[best] * method.prompts[best])
    return torch.stack(out)


def test_eval_routing_equals_hand_computation_and_has_no_noise():
    _, model, _, method = smop()
    method.eval()
    torch.manual_seed(0)
    embeds, mask = torch.randn(6, 7, model.hidden_size), torch.ones(6, 7)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    with torch.no_grad():
        first, second = method(embeds, mask), method(embeds, mask)
        expected = hand_routing(method, embeds, mask)
    assert torch.equal(first, second)
    assert torch.allclose(first, expected, atol=1e-6)


def test_training_perturbs_the_router_multiplicatively():
    _, model, _, method = smop()
    method.train()
    embeds, mask = torch.randn(64, 5, model.hidden_size), torch.ones(64, 5)
    torch.manual_seed(1)
    noisy = method.router_probs(embeds, mask)
    method.eval()
    clean = method.router_probs(embeds, mask)
    assert not torch.allclose(noisy, clean)
    method.config.noise_sigma = 0.0
    method.train()
    assert torch.allclose(method.router_probs(embeds, mask), clean)


def test_prediction_does_not_depend_on_the_other_examples_in_the_batch():
    _, model, readout, method = smop()
    model.eval(), method.eval()
    items = examples(model, readout)
    with torch.no_grad():
        together = model.score(readout, method, model.collate(readout, items))
        alone = torch.cat([model.score(readout, method, model.collate(readout, [item])) for item in items])
    assert torch.allclose(together, alone, atol=1e-5)


def test_compat_flag_reproduces_the_released_batch_sum():
    _, model, _, method = smop("method.compat_batch_sum_bug=true")
    method.eval()
    embeds, mask = torch.randn(5, 4, model.hidden_size), torch.ones(5, 4)
    with torch.no_grad():
        probs = method.router_probs(embeds, mask)
        gates, chosen = probs.max(-1)
        expected = gates[:, None, None] * method.prompts[chosen].sum(0)
        assert torch.allclose(method(embeds, mask), expected, atol=1e-6)
        # ... which makes an example's prompt depend on its batch mates
        assert not torch.allclose(method(embeds[:1], mask[:1]), method(embeds, mask)[:1])


def test_top2_is_the_gate_weighted_sum():
    _, model, _, method = smop("method.top_k=2")
    method.eval()
    embeds, mask = torch.randn(3, 4, model.hidden_size), torch.ones(3, 4)
    with torch.no_grad():
        probs = method.router_probs(embeds, mask)
        gates, chosen = probs.topk(2, -1)
        expected = torch.stack(
            [sum(g * method.prompts[c] for g, c in zip(gates[b], chosen[b])) for b in range(3)]
        )
        assert torch.allclose(method(embeds, mask), expected, atol=1e-6)


def test_gradients_reach_prompts_and_router():
    _, model, readout, method = smop()
    model.train(), method.train()
    model.loss(readout, method, model.collate(readout, examples(model, readout)), DropoutStream(0)).backward()
    assert method.prompts.grad.abs().sum() > 0 and method.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_optional():
    _, model, readout, method = smop(
        "method.load_balancing_weight=0.01", "method.perturbation=none", "backbone.dropout=false"
    )
    model.train(), method.train()
    batch = model.collate(readout, examples(model, readout))
    with torch.no_grad():
        total = method.training_loss(model, readout, batch)
        task = model.loss(readout, method, batch)
        aux = method.extra_loss()
        probs = method.router_probs(model.embed(batch["source_ids"]), batch["source_mask"])
        load = torch.bincount(probs.argmax(-1), minlength=K).float() / len(probs)
    assert aux.item() == pytest.approx(0.01 * K * (probs.mean(0) * load).sum().item(), rel=1e-5)
    assert total.item() == pytest.approx(task.item() + aux.item(), rel=1e-6)
    _, _, readout, plain = smop()
    plain.train()
    plain(torch.randn(2, 3, model.hidden_size), torch.ones(2, 3))
    assert plain.extra_loss() is None


def test_eval_stats_report_routing_fractions_and_entropy():
    _, model, _, method = smop()
    method.eval()
    with torch.no_grad():
        method(torch.randn(10, 3, model.hidden_size), torch.ones(10, 3))
    stats = method.eval_stats()
    assert sum(stats[f"router_prompt{i}_fraction"] for i in range(K)) == pytest.approx(1.0)
    assert 0 < stats["router_entropy"] <= torch.log(torch.tensor(float(K))).item()
    assert method.eval_stats() == {}  # reset after reading


def test_stochastic_routing_uses_mean_prompt_at_eval_and_consistency_in_training():
    _, model, readout, method = smop("method.routing=stochastic")
    assert method.router is None
    assert sum(p.numel() for p in method.parameters()) == K * L * model.hidden_size
    method.eval()
    out = method(torch.randn(2, 3, model.hidden_size), torch.ones(2, 3))
    assert torch.allclose(out[0], method.prompts.mean(0))
    method.train()
    loss = method.training_loss(model, readout, model.collate(readout, examples(model, readout)))
    loss.backward()
    assert method.prompts.grad.abs().sum() > 0


def test_symmetric_kl_is_zero_for_equal_and_symmetric():
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert symmetric_kl(a, a, 3).item() == pytest.approx(0.0, abs=1e-6)
    assert symmetric_kl(a, b, 3).item() == pytest.approx(symmetric_kl(b, a, 3).item(), rel=1e-5)


def test_gumbel_routing_is_one_hot_forward_with_router_gradients():
    _, model, _, method = smop("method.routing=gumbel")
    method.train()
    out = method(torch.randn(4, 3, model.hidden_size), torch.ones(4, 3))
    out.sum().backward()
    assert method.router.weight.grad.abs().sum() > 0
    method.eval()
    with torch.no_grad():
        embeds, mask = torch.randn(4, 3, model.hidden_size), torch.ones(4, 3)
        assert torch.equal(method(embeds, mask), method(embeds, mask))  # no sampling at eval
