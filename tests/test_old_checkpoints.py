"""A run folder written by an older ptlab still resumes: tests/data/run_22e2f2c is a real tiny-T5
run of 4 steps trained by commit 22e2f2c (dropout on, its masks then drawn from a generator whose
state is in the checkpoint). Today's code resumes it, says in one line that its dropout masks are
addressed from there on, and trains on to the new end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

OLD_RUN = Path(__file__).resolve().parent / "data" / "run_22e2f2c"
# the command that trained it at 22e2f2c, with trainer.max_steps raised from 4 (raising it continues a run)
COMMAND = ["backbone=tiny_t5", "logger=none", "trainer.eval_every=2", "data.max_train_examples=64",
           "data.max_eval_examples=16", "trainer.batch_size=8", "trainer.max_steps=8"]  # fmt: skip


def test_a_checkpoint_of_22e2f2c_resumes_and_says_its_dropout_is_addressed_from_there(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    done = subprocess.run([sys.executable, "-m", "ptlab.cli.train", *COMMAND, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "drew the frozen network's dropout from a stream" in output and "resumed from" in output
    assert "at step 4" in output
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [event["step"] for event in events if event["split"] == "validation"]
    assert validations == [2, 4, 6, 8]  # the old run's evaluations kept, the new ones after them
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 8
