"""Per-run state, the basis of packed sweeps (several runs in one process): each run draws from its
own random streams and logs to its own W&B run, and only the entry point reads Hydra's state."""

from __future__ import annotations

import ast
import time

import pytest
import torch

from ptlab.config.schema import to_object
from ptlab.data.examples import training_batches
from ptlab.training import loop
from ptlab.training.build import build
from ptlab.training.randomness import RunRandomness
from ptlab.training.tracking import Tracker
from ptlab.training.trainer import LogWindow, Trainer

from conftest import REPO, TINY, compose_config

# dropout on in the frozen T5 and SMoP's Gaussian router noise: both draw at every step
NOISY = [*TINY, "backbone=tiny_t5", "backbone.dropout=true", "method=smop", "trainer.batch_size=8"]
STEPS = 4


def trainer_for(tmp_path, seed: int) -> Trainer:
    config = to_object(compose_config([*NOISY, f"seed={seed}"]))
    run_dir = tmp_path / f"seed{seed}"
    run_dir.mkdir(parents=True)
    return Trainer(config=config, pipeline=build(config), tracker=Tracker(run_dir, config.logger),
                   run_dir=run_dir)  # fmt: skip


def stepping(trainer: Trainer, losses: list):
    """The trainer's steps, one per `next`, each loss appended to `losses`."""
    stream = training_batches(trainer.train_lengths, trainer.config, trainer.seed, trainer.state)
    window = LogWindow(losses=losses)
    for _ in range(STEPS):
        elapsed, (loss,) = loop.step([(trainer, stream)])  # a step of the run alone
        trainer.count_step(loss, elapsed, 0, window)
        yield


def outcome(trainer: Trainer, losses: list):
    """What a run ends with: its step losses, its trained tensors, its validation metrics."""
    trained = {name: tensor.detach().clone() for name, tensor in trainer.checkpoint.trainable_state().items()}
    return losses, trained, trainer.run_eval("validation")


def test_runs_interleaved_step_by_step_end_as_each_run_alone(tmp_path):
    alone = []
    for seed in (0, 1):
        trainer, losses = trainer_for(tmp_path / "alone", seed), []
        for _ in stepping(trainer, losses):
            pass
        alone.append(outcome(trainer, losses))

    trainers = [trainer_for(tmp_path / "packed", seed) for seed in (0, 1)]
    losses = [[], []]
    for _ in zip(*(stepping(trainer, run_losses) for trainer, run_losses in zip(trainers, losses))):
        pass  # zip advances run 0 one step, then run 1, and again
    assert trainers[0].backbone.model.training  # the frozen model's dropout was on
    packed = [outcome(trainer, run_losses) for trainer, run_losses in zip(trainers, losses)]

    for (alone_losses, alone_trained, alone_metrics), (losses_, trained, metrics) in zip(alone, packed):
        assert len(losses_) == STEPS and losses_ == alone_losses
        assert trained.keys() == alone_trained.keys()
        assert all(torch.equal(trained[name], alone_trained[name]) for name in trained)
        assert metrics == alone_metrics
    assert alone[0][0] != alone[1][0]  # two different runs, not one run twice


def test_a_runs_streams_leave_the_global_generator_as_it_was_and_resume_from_their_state():
    randomness = RunRandomness(seed=3)
    outside = torch.get_rng_state()
    with randomness.active(torch.device("cpu")):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside)
    copy = RunRandomness(seed=0)
    copy.load_state_dict(randomness.state_dict())
    with randomness.active(torch.device("cpu")):
        expected = torch.rand(4), torch.rand(2, generator=randomness.generator)
    with copy.active(torch.device("cpu")):
        assert torch.equal(torch.rand(4), expected[0]) and not torch.equal(expected[0], first)
    assert torch.equal(torch.rand(2, generator=copy.generator), expected[1])


def test_two_trackers_open_at_once_log_to_their_own_wandb_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = to_object(compose_config(["logger=wandb"])).logger
    trackers = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        trackers[name] = Tracker(tmp_path / name, logger, wandb_init={"name": name})
        trackers[name].start()
    for step in (1, 2):
        for name, tracker in trackers.items():
            tracker.log(step, f"train_{name}", {"loss": float(step)})
    infos = {name: tracker.wandb_info() for name, tracker in trackers.items()}
    for tracker in trackers.values():
        tracker.summary({"steps": 2})
        tracker.finish()
    assert infos["a"]["id"] != infos["b"]["id"]
    for name, other in (("a", "b"), ("b", "a")):
        (folder,) = (tmp_path / name / "wandb").glob(f"offline-run-*-{infos[name]['id']}")
        # W&B's service closes a finished run's file on its own time: read it once its stream has ended
        internal_log = folder / "logs" / "debug-internal.log"
        deadline = time.monotonic() + 120
        while "stream: all finished" not in internal_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "stream: all finished" in internal_log.read_text()
        logged = (folder / f"run-{infos[name]['id']}.wandb").read_bytes()
        assert f"train_{name}/loss".encode() in logged and f"train_{other}/loss".encode() not in logged


def imports_of(path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", ["hydra.core.hydra_config", "hydra.types"])
def test_only_the_entry_point_reads_hydras_runtime_state(module):
    # the entry points (cli/) and the Hydra launcher plugin's package (sweep/) are Hydra's glue
    below = [path for path in (REPO / "ptlab").rglob("*.py") if not {"cli", "sweep"} & set(path.relative_to(REPO).parts)]
    assert len(below) > 40
    assert [str(path.relative_to(REPO)) for path in below if module in imports_of(path)] == []
