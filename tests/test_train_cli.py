"""`dgemma train` from the command line: a short run writes what it promises; bad input is one
line and a non-zero exit, and nothing is left half-written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import tiny
import train_reference as R
from dgemma_mlx.cli import app

FAST = ["--iters", "2", "--batch-size", "2", "--lora-rank", "2", "--steps-per-report", "1"]


def dgemma(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *words):
    assert result.exit_code not in (0, None), result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dgemma: error:"), lines[0]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    rows = R.reverse_rows(6, 5)
    R.write_jsonl(path / "train.jsonl", rows)
    R.write_jsonl(path / "valid.jsonl", rows[:2])
    R.write_jsonl(path / "test.jsonl", rows[2:4])
    return path


def train(checkpoint, data, out, *more):
    return dgemma("train", "--model", checkpoint, "--data", data, "--adapter-path", out, *FAST, *more)


def test_a_short_run_writes_adapters_a_log_and_the_test_loss(checkpoint, data, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text("iters: 3\nlora-mode: shared\nsteps_per_eval: 3\n")
    r = dgemma("train", "--model", checkpoint, "--data", data, "--adapter-path", out, "-c", config,
               "--batch-size", "2", "--lora-rank", "2", "--test")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors", "training_log.json"]
    assert json.loads((out / "adapter_config.json").read_text())["separate"] is False
    log = json.loads((out / "training_log.json").read_text())
    assert log["iterations"] == 3 and any(h["kind"] == "val" for h in log["history"])
    assert r.stdout.startswith("test loss ")
    r = dgemma("train", "--model", checkpoint, "--data", data, "--adapter-path", tmp_path / "unused",
               "--iters", "0", "--test", "--resume-adapter-file", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("test loss ") and not (tmp_path / "unused").exists()


def bad_data(tmp_path, text: str):
    path = tmp_path / "bad"
    path.mkdir()
    (path / "train.jsonl").write_text(text)
    return path


@pytest.mark.parametrize("text, words", [
    ("", ["no rows"]),
    ('{"text": "abc"}\n{"text": "abc"\n', ["train.jsonl:2", "not valid JSON"]),
    ('{"prompt": "abc", "completion": ""}\n', ["train.jsonl:1", "no supervised token"]),
    ('{"text": ""}\n', ["train.jsonl:1", "no supervised token"]),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ["train.jsonl:1", "assistant"]),
    ('{"question": "abc"}\n', ["train.jsonl:1", "needs"]),
    ('[1, 2]\n', ["train.jsonl:1", "JSON object"]),
    ('{"prompt": "' + "x" * 200 + '", "completion": "y"}\n', ["train.jsonl:1", "max-seq-length"]),
])
def test_bad_rows_are_one_line_naming_file_and_line(checkpoint, tmp_path, text, words):
    out = tmp_path / "out"
    one_line_error(train(checkpoint, bad_data(tmp_path, text), out, "--max-seq-length", "64"), *words)
    assert not out.exists()


def test_missing_data_is_one_line(checkpoint, tmp_path):
    one_line_error(train(checkpoint, tmp_path / "nowhere", tmp_path / "out"), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(train(checkpoint, tmp_path / "empty", tmp_path / "out"), "no train.jsonl")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(checkpoint, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    one_line_error(train(checkpoint, data, out), "already exists", "--force")
    assert (out / "mine.txt").read_text() == "keep me"


def test_resuming_from_adapters_of_another_model_is_refused(checkpoint, data, tmp_path):
    other = tiny.build_reference(tmp_path / "other", spec=tiny.TinySpec(hidden_size=32, intermediate_size=48))[1]
    assert train(other, data, tmp_path / "small").exit_code == 0
    out = tmp_path / "out"
    one_line_error(train(checkpoint, data, out, "--resume-adapter-file", tmp_path / "small"), "do not match")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["state", "optimizer", "result"])
def test_a_broken_resume_checkpoint_is_one_line(checkpoint, data, tmp_path, damage):
    out = tmp_path / "out"
    stop = [False]

    from dgemma_mlx.train import TrainingArgs, run
    from dgemma_mlx.adapters import AdapterConfig

    def interrupt(r):
        if r.kind == "train":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, data, out, TrainingArgs(iters=5, batch_size=2, steps_per_report=1, lora=AdapterConfig(rank=2)),
            report=interrupt)
    ckpt = out / "checkpoint"
    target = {"state": ckpt / "trainer_state.json", "optimizer": ckpt / "optimizer.safetensors",
              "result": ckpt / "result" / "adapters.safetensors"}[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    one_line_error(train(checkpoint, data, out, "--resume-adapter-file", ckpt), str(ckpt.name))
    assert target.exists()  # the user's checkpoint is left as it was


@pytest.mark.parametrize("flags, words", [
    (["--iters", "0"], ["--iters"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--learning-rate", "-1"], ["--learning-rate"]),
    (["--max-seq-length", "0"], ["--max-seq-length"]),
    (["--val-batches", "0"], ["--val-batches"]),
    (["--fine-tune-type", "qlora"], ["qlora"]),
    (["--lora-mode", "both"], ["--lora-mode"]),
    (["--lora-rank", "0"], ["rank"]),
    (["--lora-dropout", "1.5"], ["dropout"]),
    (["--noise-min", "0.9", "--noise-max", "0.5"], ["noise"]),
    (["--self-conditioning-p", "2"], ["self-conditioning"]),
    (["--encoder-loss-weight", "-1"], ["--encoder-loss-weight"]),
    (["--blocks-per-example", "0"], ["--blocks-per-example"]),
    (["--ordered-corruption", "1.5"], ["--ordered-corruption"]),
    (["--warmup", "10"], ["--warmup"]),
    (["--from-scratch", "--fine-tune-type", "lora"], ["--from-scratch"]),
])
def test_bad_flag_values_are_one_line(checkpoint, data, tmp_path, flags, words):
    out = tmp_path / "out"
    one_line_error(train(checkpoint, data, out, *flags), *words)
    assert not out.exists()


def test_yaml_config_with_an_unknown_key_is_one_line(checkpoint, data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("iters: 2\nlearning_rat: 0.1\n")
    one_line_error(train(checkpoint, data, tmp_path / "out", "-c", config), "learning_rat")
    config.write_text("iters: [2\n")
    one_line_error(train(checkpoint, data, tmp_path / "out", "-c", config), "YAML")
    one_line_error(train(checkpoint, data, tmp_path / "out", "-c", tmp_path / "none.yaml"), "none.yaml")
    assert not (tmp_path / "out").exists()


def test_test_flag_without_a_test_split_is_one_line(checkpoint, tmp_path):
    path = tmp_path / "d"
    R.write_jsonl(path / "train.jsonl", R.reverse_rows(4, 5))
    one_line_error(dgemma("train", "--model", checkpoint, "--data", path, "--adapter-path", tmp_path / "o",
                          "--iters", "0", "--test"), "test.jsonl")
