"""An interrupted run resumed from its checkpoint draws the loss curve of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

import train_reference as R
from test_cli import restore_sigint
from dgemma_mlx.train import TrainingArgs, run
from dgemma_mlx.train.run import prepare

ITERS, STOP = 6, 3


def args(kind: str) -> TrainingArgs:
    common = dict(iters=ITERS, batch_size=2, learning_rate=1e-3, warmup=2, steps_per_report=1, save_every=100,
                  max_seq_length=48, seed=3)
    if kind == "lora":
        from dgemma_mlx.adapters import AdapterConfig

        return TrainingArgs(fine_tune_type="lora", lora=AdapterConfig(rank=4, dropout=0.1), **common)
    return TrainingArgs(fine_tune_type="full", **common)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    R.write_jsonl(path / "train.jsonl", R.reverse_rows(9, 20))
    return path


def losses(history):
    return [(h["iteration"], h["loss"], h["diffusion_loss"], h["encoder_loss"]) for h in history if h["kind"] == "train"]


class Stop(Exception):
    pass


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_resumed_run_continues_the_uninterrupted_loss_curve(checkpoint, data, tmp_path, kind):
    whole = run(checkpoint, data, tmp_path / "whole", args(kind))

    def interrupt(r):
        if r.kind == "train" and r.iteration == STOP:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, data, tmp_path / "cut", args(kind), report=interrupt)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["iteration"] == STOP
    resumed = run(checkpoint, data, tmp_path / "cut", args(kind), resume=tmp_path / "cut" / "checkpoint")

    a, b = losses(whole.history), losses(resumed.history)
    assert [x[0] for x in b] == list(range(1, ITERS + 1))
    np.testing.assert_allclose(np.array(b)[:, 1:], np.array(a)[:, 1:], atol=1e-6, rtol=0)
    assert not (tmp_path / "cut" / "checkpoint").exists()  # the finished run replaced it
    wa = dict(mx.load(str(next((tmp_path / "whole").glob("*.safetensors")))))
    wb = dict(mx.load(str(next((tmp_path / "cut").glob("*.safetensors")))))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6, rtol=0)


def test_a_run_stopped_after_n_iterations_resumes_to_the_uninterrupted_result(checkpoint, data, tmp_path):
    whole = run(checkpoint, data, tmp_path / "whole", args("full"))
    cut = run(checkpoint, data, tmp_path / "cut", replace(args("full"), stop_after=STOP))
    assert cut.iteration == STOP and not list((tmp_path / "cut").glob("*.safetensors"))  # no final result yet
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["iteration"] == STOP
    resumed = run(checkpoint, data, tmp_path / "cut", args("full"), resume=tmp_path / "cut" / "checkpoint")
    np.testing.assert_allclose(np.array(losses(resumed.history))[:, 1:], np.array(losses(whole.history))[:, 1:],
                               atol=1e-6, rtol=0)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(checkpoint, data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dgemma_mlx", "train", "--model", str(checkpoint), "--data", str(data),
           "--adapter-path", str(out), "--iters", "100000", "--batch-size", "2", "--steps-per-report", "1",
           "--lora-rank", "4"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=restore_sigint)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("iter 2:"):
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "Traceback" not in rest
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["iteration"] >= 2
    assert (out / "checkpoint" / "result" / "adapters.safetensors").is_file()
