"""The CUDA path: a bf16 training step, evaluation, resume and DDP (nccl) on a GPU.

`pytest -m cuda` runs them where a GPU is visible (scripts/gpu_check.py does). Without one they
are skipped, unless PTLAB_CUDA_TESTS_ON_CPU=1 (the GPU kit's dry run) runs the same tests on the
CPU with `hardware=cpu` and gloo, so the kit is rehearsed on machines that have no GPU.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_scale_out import QUICK, cli, trained_prompt

from ptlab.training import checkpoint, loop
from ptlab.training.devices import to_device
from ptlab.training.job import run

from conftest import TINY, compose_config
from helpers import build, examples

ON_CUDA = torch.cuda.is_available()
ON_CPU_REHEARSAL = not ON_CUDA and os.environ.get("PTLAB_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (ON_CUDA or ON_CPU_REHEARSAL),
        reason="needs a CUDA device (PTLAB_CUDA_TESTS_ON_CPU=1 rehearses these tests on the CPU)",
    ),
]
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
HARDWARE = "hardware=gpu" if ON_CUDA else "hardware=cpu"
STEPS = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=1", "trainer.batch_size=8"]
BACKBONES = ["tiny_t5", "tiny_llama", "tiny_bert"]


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_CUDA else torch.autocast("cpu", enabled=False)


def train(tmp_path, name, overrides):
    run_dir = tmp_path / name
    run(compose_config([*TINY, HARDWARE, *overrides]), run_dir=run_dir)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("method_name", ["prompt_tuning", "deep_prompt"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_bf16_training_step_keeps_an_fp32_prompt_with_finite_gradients(backbone, method_name):
    _, model, readout, method = build([f"backbone={backbone}", f"method={method_name}"])
    model.to(DEVICE), method.to(DEVICE)
    batch = to_device(model.collate(readout, examples(model, readout)), DEVICE)
    with autocast():
        logits = model.output_logits(readout, method, batch)
        loss = model.loss_from_logits(logits, batch)
    loss.backward()
    expected = torch.bfloat16 if ON_CUDA else torch.float32
    assert logits.dtype == expected and torch.isfinite(loss)
    for parameter in method.parameters():
        assert parameter.dtype == torch.float32 and parameter.device.type == DEVICE.type
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    assert all(p.grad is None for p in model.model.parameters())  # the backbone stays frozen


@pytest.mark.parametrize("method_name", ["prompt_tuning", "deep_prompt"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_run_on_the_device(tmp_path, backbone, method_name):
    run_dir, summary = train(tmp_path, backbone, [f"backbone={backbone}", f"method={method_name}", *STEPS])
    assert summary["steps"] == 6 and summary["peak_memory_mb"] > 0
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in events if e["split"] == "train")
    assert (run_dir / "checkpoints/best/prompt.safetensors").exists()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_device_scores_equal_cpu_scores_in_fp32_and_stay_close_in_bf16(backbone):
    _, model, readout, method = build([f"backbone={backbone}", "backbone.dropout=false"])
    model.eval()
    batch = model.collate(readout, examples(model, readout))
    with torch.no_grad():
        cpu = model.score(readout, method, batch)
        model.to(DEVICE), method.to(DEVICE)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            fp32 = model.score(readout, method, to_device(batch, DEVICE)).float().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        with autocast():
            bf16 = model.score(readout, method, to_device(batch, DEVICE)).float().cpu()
    torch.testing.assert_close(fp32, cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bf16, cpu, atol=0.1 * cpu.abs().max().item() + 1e-3, rtol=0.05)


class Killed(Exception):
    pass


def test_killed_run_resumes_on_the_device_like_an_uninterrupted_one(tmp_path, monkeypatch):
    overrides = ["backbone=tiny_t5", "backbone.dropout=true", *STEPS]  # dropout: RNG state matters
    full, full_summary = train(tmp_path, "full", overrides)
    original_step = loop.step

    def dies_at_step_4(runs):
        if runs[0][0].state.step == 4:
            raise Killed()
        return original_step(runs)

    monkeypatch.setattr(loop, "step", dies_at_step_4)
    with pytest.raises(Killed):
        train(tmp_path, "resumed", overrides)
    monkeypatch.setattr(loop, "step", original_step)
    resumed, resumed_summary = train(tmp_path, "resumed", [*overrides, "trainer.resume=true"])
    assert resumed_summary["steps"] == full_summary["steps"] == 6
    for key in ("best", "final"):
        assert resumed_summary[key] == pytest.approx(full_summary[key], abs=1e-5)
    full_state = checkpoint.load_training_state(full / "checkpoints/last")["trainable"]
    resumed_state = checkpoint.load_training_state(resumed / "checkpoints/last")["trainable"]
    for name, tensor in full_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, atol=1e-6, rtol=1e-6)


def test_ddp_with_one_process_trains_the_single_process_prompt(tmp_path):
    """torchrun with one rank: nccl on a GPU (gloo in the CPU rehearsal), one run folder."""
    distributed = ["hardware=multi_gpu"] if ON_CUDA else ["hardware=cpu", "hardware.distributed=true"]
    steps = [*QUICK, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=8"]
    single = cli([*steps, HARDWARE, f"hydra.run.dir={tmp_path / 'single'}"], timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ptlab.cli.train")
    ddp = cli([*steps, *distributed], cwd=tmp_path, launcher=launcher, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (summary,) = (tmp_path / "outputs/runs").glob("**/summary.json")  # one rank: one run folder
    run_dir = summary.parent
    torch.testing.assert_close(
        trained_prompt(run_dir), trained_prompt(tmp_path / "single"), atol=1e-5, rtol=1e-5
    )
