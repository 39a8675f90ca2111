"""The ``dgemma generate`` / ``dgemma convert`` command lines, run as a user runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from dgemma_mlx.canvas import terminal_safe

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
FAST = ["--steps", "3", "--seed", "1"]


def dgemma(*args, input=None, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "dgemma_mlx", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
    )


def one_line_error(result, *words):
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dgemma: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_piped_generate_prints_only_the_answer_and_stats_on_stderr(checkpoint):
    r = dgemma("generate", "--model", str(checkpoint), *FAST, "-n", "20", "Why is the sky blue?")
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stdout and r.stdout.endswith("\n") and r.stdout.strip()
    assert "prompt:" in r.stderr and "generation: 20 tokens" in r.stderr


def test_prompt_is_read_from_stdin(checkpoint):
    piped = dgemma("generate", "--model", str(checkpoint), *FAST, "-n", "16", input="Why is the sky blue?")
    dash = dgemma("generate", "-", "--model", str(checkpoint), *FAST, "-n", "16", input="Why is the sky blue?")
    arg = dgemma("generate", "Why is the sky blue?", "--model", str(checkpoint), *FAST, "-n", "16")
    assert piped.returncode == dash.returncode == arg.returncode == 0
    assert piped.stdout == dash.stdout == arg.stdout


def test_events_are_json_lines_for_every_pass_and_commit(checkpoint, tmp_path):
    path = tmp_path / "events.jsonl"
    r = dgemma("generate", "--model", str(checkpoint), *FAST, "-n", "20", "--events", str(path), "Hello")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds == ["pass"] * 3 + ["commit"] + ["pass"] * 3 + ["commit", "end"]
    first = events[0]
    assert {"block", "step", "canvas", "accepted", "entropy", "mean_entropy", "temperature"} <= set(first)
    assert len(first["canvas"]) == 16 and events[-1]["stats"]["generated_tokens"] == 20


def test_events_on_stdout_keep_stdout_pure_json(checkpoint):
    r = dgemma("generate", "--model", str(checkpoint), *FAST, "-n", "16", "--events", "-", "Hello")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["type"] for line in r.stdout.splitlines()][-1] == "end"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "0", "hi"], ["steps"]),
        (["--t-min", "0.8", "--t-max", "0.8", "hi"], ["t-min", "t-max"]),
        (["--t-min", "0.9", "--t-max", "0.5", "hi"], ["t-min"]),
        (["--entropy-bound", "0", "hi"], ["entropy-bound"]),
        (["--entropy-bound", "-1", "hi"], ["entropy-bound"]),
        (["   "], ["empty"]),
    ],
)
def test_bad_settings_and_empty_prompt_are_one_line_errors(checkpoint, args, words):
    one_line_error(dgemma("generate", "--model", str(checkpoint), *args), *words)


def test_prompt_longer_than_the_context_is_a_one_line_error(checkpoint):
    long = "a " * 5000  # the tiny model's context is 4096 positions
    one_line_error(dgemma("generate", "--model", str(checkpoint), long), "context")


def test_unknown_model_directory_is_a_one_line_error(tmp_path):
    one_line_error(dgemma("generate", "--model", str(tmp_path / "nope"), "hi"), "does not exist")


def test_default_model_without_hub_access_says_to_pass_a_local_model(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "DGEMMA_MODEL": ""}
    r = dgemma("generate", "hi", env=env)
    one_line_error(r, "mlx-community/diffusiongemma-26B-A4B-it-4bit", "--model PATH")


def test_model_comes_from_the_environment_variable(checkpoint):
    r = dgemma("generate", *FAST, "-n", "16", "hi", env={"DGEMMA_MODEL": str(checkpoint)})
    assert r.returncode == 0, r.stderr


def test_piping_into_head_causes_no_traceback(checkpoint):
    # A fixed seed: with a random one the tiny random model now and then ends its answer in one token.
    cmd = f"{sys.executable} -m dgemma_mlx generate --model {checkpoint} --steps 2 -n 2000 --seed 0 hi | head -c 5"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=300)
    stderr = r.stderr.decode(errors="replace")
    assert "Traceback" not in stderr and "Error" not in stderr
    assert len(r.stdout) == 5


def restore_sigint() -> None:
    """``preexec_fn`` of a child a test interrupts: SIGINT back to its default disposition, so the
    child's Python turns it into KeyboardInterrupt even when the test run ignores SIGINT (a
    non-interactive shell starts background jobs with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args, checkpoint, **kw):
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "30"}
    return pexpect.spawn(
        sys.executable, ["-m", "dgemma_mlx", "generate", "--model", str(checkpoint), *args],
        env=env, dimensions=(30, 100), encoding="utf-8", timeout=120, preexec_fn=restore_sigint, **kw,
    )


def test_terminal_run_shows_the_passes_and_ends_with_the_answer(checkpoint, tmp_path):
    events = tmp_path / "events.jsonl"
    child = spawn(["--steps", "4", "--seed", "3", "-n", "32", "--events", str(events), "Why?"], checkpoint)
    child.expect(pexpect.EOF)
    child.close()
    out = ANSI.sub("", child.before)
    assert child.exitstatus == 0, out
    statuses = re.findall(r"block (\d+) · step (\d+)/4", out)  # the live view's status line
    assert len(statuses) >= 2 and {b for b, _ in statuses} == {"1", "2"}
    answer = json.loads(events.read_text().splitlines()[-1])["text"]
    tail = out[out.rindex("step "):]
    assert answer.strip()[-8:] in tail.replace("\n", "")


def test_ctrl_c_keeps_the_committed_text_and_exits_130(checkpoint, tmp_path):
    # A random model may end its answer early (EOS); seeds are tried until the interrupt lands
    # while the generation is still running (after two committed blocks).
    for seed in range(3, 15):
        events = tmp_path / f"events-{seed}.jsonl"
        child = spawn(["--steps", "48", "-n", "4000", "--seed", str(seed), "--events", str(events), "Why?"], checkpoint)
        deadline = time.time() + 120
        text = ""
        while time.time() < deadline:
            text = events.read_text() if events.exists() else ""
            if text.count('"type": "commit"') >= 2 or '"type": "end"' in text:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # let the live view catch up with the committed blocks (a loaded machine lags)
        text = events.read_text() if events.exists() else ""
        if '"type": "end"' in text:
            child.expect(pexpect.EOF)
            child.close()
            continue
        child.kill(signal.SIGINT)
        child.expect(pexpect.EOF)
        child.close()
        out = ANSI.sub("", child.before)
        assert child.exitstatus == 130, out
        assert "Traceback" not in out and "Interrupted" in out
        commits = [json.loads(line) for line in events.read_text().splitlines() if '"commit"' in line]
        committed = "".join(c["text"] for c in commits)
        # The terminal shows control characters as symbols (a random model emits some).
        shown = terminal_safe(committed.strip())
        assert shown[:8] in out.replace("\n", "")
        return
    pytest.fail("every seed's generation ended before the interrupt")


def test_convert_command_writes_a_loadable_model_and_refuses_to_overwrite(checkpoint, tmp_path):
    out = tmp_path / "mlx"
    r = dgemma("convert", "--hf-path", str(checkpoint), "--mlx-path", str(out), "-q", "--q-group-size", "32")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    again = dgemma("convert", "--hf-path", str(checkpoint), "--mlx-path", str(out))
    one_line_error(again, "already exists", "--force")


@pytest.mark.parametrize(
    "args, words",
    [(["--q-bits", "3"], ["--q-bits"]), (["--q-group-size", "50"], ["--q-group-size"]), (["--dtype", "int8"], ["--dtype"])],
)
def test_convert_bad_options_are_one_line_errors_and_write_nothing(checkpoint, tmp_path, args, words):
    out = tmp_path / "mlx"
    one_line_error(dgemma("convert", "--hf-path", str(checkpoint), "--mlx-path", str(out), "-q", *args), *words)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_convert_of_a_missing_source_is_a_one_line_error(tmp_path):
    one_line_error(
        dgemma("convert", "--hf-path", str(tmp_path / "missing"), "--mlx-path", str(tmp_path / "out")), "does not exist"
    )
    assert not (tmp_path / "out").exists()


def test_convert_script_in_convert_dir_has_the_same_options(checkpoint, tmp_path):
    script = Path(__file__).parents[1] / "convert" / "convert.py"
    r = subprocess.run(
        [sys.executable, str(script), "--hf-path", str(checkpoint), "--mlx-path", str(tmp_path / "m"), "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()


# -- issue 10: what a new user hit ------------------------------------------------------------------


def test_seed_minus_one_is_random_and_seeds_outside_uint64_are_one_line_errors(checkpoint):
    assert dgemma("generate", "--model", str(checkpoint), "--steps", "2", "-n", "16", "--seed", "-1", "hi").returncode == 0
    top = dgemma("generate", "--model", str(checkpoint), "--steps", "2", "-n", "16", "--seed", str(2**64 - 1), "hi")
    assert top.returncode == 0, top.stderr
    for bad in (str(2**64), "-2"):
        one_line_error(dgemma("generate", "--model", str(checkpoint), "--seed", bad, "hi"), "seed", "2**64")


def test_a_mistyped_local_path_says_no_such_directory_before_blaming_the_hub(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    r = dgemma("generate", "-m", "models/dg4bit", "hi", env=env)
    one_line_error(r, "models/dg4bit", "no such local directory", "cannot be reached")
    one_line_error(dgemma("generate", "-m", "models/dg/4bit", "hi", env=env), "does not exist")  # not a repo id


def test_non_utf8_input_is_a_one_line_error(checkpoint):
    piped = subprocess.run([sys.executable, "-m", "dgemma_mlx", "generate", "--model", str(checkpoint), "-"],
                           input=b"caf\xe9?", capture_output=True, timeout=300)
    one_line_error(subprocess.CompletedProcess(piped.args, piped.returncode, "", piped.stderr.decode()), "UTF-8")
    argv = subprocess.run([sys.executable.encode(), b"-m", b"dgemma_mlx", b"generate", b"--model",
                           str(checkpoint).encode(), b"caf\xe9?"], capture_output=True, timeout=300)
    one_line_error(subprocess.CompletedProcess(argv.args, argv.returncode, "", argv.stderr.decode()), "UTF-8")


def test_a_piped_prompt_loses_its_trailing_newline(checkpoint):
    args = ["--model", str(checkpoint), *FAST, "-n", "16"]
    piped = dgemma("generate", *args, input="Why is the sky blue?\n")
    arg = dgemma("generate", *args, "Why is the sky blue?")
    assert piped.returncode == arg.returncode == 0
    assert piped.stdout == arg.stdout


def test_no_third_party_warning_reaches_the_terminal(checkpoint, tmp_path):
    # A tokenizer whose model_max_length is short makes transformers warn about long prompts.
    short = tmp_path / "short"
    shutil.copytree(checkpoint, short)
    config = json.loads((short / "tokenizer_config.json").read_text())
    (short / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    r = subprocess.run([sys.executable, "-m", "dgemma_mlx", "generate", "--model", str(short), "a " * 5000],
                       capture_output=True, text=True, timeout=300, env=env)
    one_line_error(r, "context")


def test_version_and_shell_completion_are_available():
    r = dgemma("--version")
    assert r.returncode == 0 and re.fullmatch(r"dgemma \S+\n", r.stdout)
    assert "--install-completion" in dgemma("--help").stdout


def test_help_shows_metavars_defaults_from_the_code_and_no_type_placeholders():
    from dgemma_mlx.settings import DEFAULTS

    text = dgemma("generate", "--help").stdout
    assert "--model PATH" in text and "--events PATH" in text
    assert "<str>" not in text and "<bool>" not in text
    assert f"else {DEFAULTS.steps})" in text and f"else {DEFAULTS.t_max})" in text.replace("\n", " ").replace("  ", "")
    assert "--max-tokens" in text and "--system-prompt" in text and "--ignore-chat-template" in text
    assert "--max-new-tokens" not in text and "--no-chat-template" not in text  # old spellings: hidden


def test_every_commands_options_show_metavars_not_type_placeholders():
    import typer

    from dgemma_mlx.cli import app

    commands = sorted(typer.main.get_command(app).commands)
    assert {"generate", "train", "fuse", "sudoku", "serve"} <= set(commands)
    for command in commands:
        text = dgemma(command, "--help").stdout
        options = [line for line in text.splitlines() if line.lstrip().startswith("-")]
        assert options, command
        assert not [line for line in options if re.search(r"<(str|int|float|bool|path)>", line)], command


def test_old_spellings_still_work(checkpoint):
    r = dgemma("generate", "--model", str(checkpoint), *FAST, "--max-new-tokens", "16", "--system", "Be brief.",
               "--no-chat-template", "-q", "hi")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # -q is still --quiet here


@pytest.mark.parametrize("flag, hint", [("--temperature", "--temp"), ("--t_min", "--t-min"), ("--top-p", "--entropy-bound"),
                                        ("--max-length", "--max-tokens")])
def test_unknown_flags_point_at_the_right_ones(flag, hint):
    r = dgemma("generate", flag, "1", "hi")
    assert r.returncode == 2
    one_line_error(r, f"did you mean {hint}")


@pytest.mark.parametrize("command, flag, hint, not_hinted", [
    ("infill", "--length", "--fill-length", "--max-tokens"),  # infill has no --max-tokens
    ("sudoku", "--temperature", None, "--temp"),  # nor does sudoku have --temp
    ("serve", "--temperature", None, "--temp"),
    ("sudoku", "--top-p", None, "--entropy-bound"),
    ("convert", "--model", "--hf-path (the checkpoint to convert)", "--model"),
    ("convert", "-o", "--mlx-path", "--events"),
])
def test_hints_name_only_options_the_command_has(command, flag, hint, not_hinted):
    r = dgemma(command, flag, "1")
    assert r.returncode == 2
    one_line_error(r, f"no such option: {flag}")
    assert f"did you mean {not_hinted}" not in r.stderr
    if hint:
        assert f"did you mean {hint}?" in r.stderr


@pytest.mark.parametrize("command, flag", [("generate", "--max-tokens"), ("train", "--learning-rate")])
def test_an_option_missing_its_value_points_at_the_commands_help(command, flag):
    r = dgemma(command, flag)
    assert r.returncode == 2
    one_line_error(r, f"Option '{flag}' requires an argument", f"see 'dgemma {command} --help'")


def test_a_constant_temperature_is_allowed(checkpoint, tmp_path):
    events = tmp_path / "events.jsonl"
    r = dgemma("generate", "--model", str(checkpoint), "--steps", "3", "--seed", "1", "-n", "16", "--temp", "0.7",
               "--events", str(events), "hi")
    assert r.returncode == 0, r.stderr
    passes = [json.loads(line) for line in events.read_text().splitlines() if '"pass"' in line]
    assert passes and all(p["temperature"] == pytest.approx(0.7) for p in passes)
    one_line_error(dgemma("generate", "--model", str(checkpoint), "--temp", "0.7", "--t-min", "0.1", "hi"), "--temp")


def test_stats_say_one_block_and_small_peak_memory_in_megabytes(checkpoint):
    r = dgemma("generate", "--model", str(checkpoint), *FAST, "-n", "16", "hi")
    assert r.returncode == 0, r.stderr
    assert re.search(r", 1 block, ", r.stderr) and re.search(r"peak memory \d+ MB", r.stderr)


def test_help_and_argument_errors_do_not_import_model_code():
    code = (
        "import sys\nfrom dgemma_mlx.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['generate', '--steps', '0', 'hi'], ['generate', '--bogus']):\n"
        "    main(argv)\n"
        "print('mlx.core' in sys.modules, 'transformers' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "False False", r.stdout + r.stderr


def test_a_preset_caps_the_passes_and_explicit_flags_override_it():
    from dgemma_mlx.cli import SamplingArgs

    assert SamplingArgs(preset="faster").overrides() == {"steps": 8}
    assert SamplingArgs(preset="fast", steps=20).overrides() == {"steps": 20}
    assert SamplingArgs(preset="reference").overrides() == {}
    assert SamplingArgs(short_canvas=True, top_k=64).overrides() == {"short_canvas": True, "top_k": 64}


def test_an_unknown_preset_is_a_one_line_error(checkpoint):
    one_line_error(dgemma("generate", "--model", str(checkpoint), "--preset", "turbo", "hi"), "--preset", "fast")
