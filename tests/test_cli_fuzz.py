"""Property-based fuzz of the command line and of the chat's ``/params``.

The property (issue 10): whatever the flags, prompt bytes, ``--model`` directory or config JSON,
``dgemma`` exits 0, or exits non-zero with exactly one line on stderr and no traceback; and it
writes nothing outside the paths the user named. The CLI runs in-process (``main(argv)``) on the
tiny checkpoint, with stdin, stdout and stderr captured; the Hub is offline.

Bounded for CI (about 40 s on 2 cores): a fixed number of cases per property, scaled by
``DGEMMA_FUZZ_SCALE`` (valid settings are drawn small so each generation is a few passes).
``pytest -s`` prints how many cases ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgemma_mlx.cli import main

SCALE = float(os.environ.get("DGEMMA_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
RAN: dict[str, int] = {}


def count(name: str) -> None:
    RAN[name] = RAN.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print(f"\nfuzz cases run: {RAN}")


# -- values ------------------------------------------------------------------------------------------

junk = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "-", "nan", "inf", "-inf", "1e999", "0x10", "１２", "\udcff", "--", "-1", "18446744073709551616"]),
)
small_int = st.integers(-3, 4).map(str)
big_int = st.sampled_from([-(2**70), -2, -1, 0, 2**63, 2**64 - 1, 2**64, 10**30]).map(str)
number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["0", "0.0", "-0.0", "1e-300", "1e300", "0.5", "2"]),
)


def flag(name: str, values) -> st.SearchStrategy[list[str]]:
    return st.tuples(st.just(name), values).map(list)


def mostly(valid, invalid):
    """Valid values three times out of four: most runs get as far as generating."""
    return st.one_of(valid, valid, valid, invalid)


def floats(lo: float, hi: float):
    return st.floats(lo, hi).map(repr)


SAMPLING_FLAGS = st.lists(
    st.one_of(
        flag("--steps", mostly(st.integers(1, 4).map(str), st.one_of(small_int, junk))),
        flag("--max-tokens", mostly(st.integers(1, 40).map(str), st.one_of(st.integers(-2, 0).map(str), junk))),
        flag("-n", st.integers(-2, 40).map(str)),
        flag("--entropy-bound", mostly(floats(0.01, 5), st.one_of(number, junk))),
        flag("--t-min", mostly(floats(0, 0.5), st.one_of(number, junk))),
        flag("--t-max", mostly(floats(0.6, 2), st.one_of(number, junk))),
        flag("--temp", mostly(floats(0.05, 3), st.one_of(number, junk))),
        flag("--seed", mostly(st.one_of(st.integers(0, 2**64 - 1), st.just(-1)).map(str), st.one_of(big_int, junk))),
        st.sampled_from([["--quiet"], ["-q"], ["--think"], ["--no-think"], ["--ignore-chat-template"]]),
        flag("--system-prompt", st.text(max_size=8)),
        st.sampled_from([["--temperature", "1"], ["--top-p", "0.9"], ["--bogus"], ["-Z"]]),
    ),
    max_size=4,
).map(lambda groups: [a for g in groups for a in g])


def config_json():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=6))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=10)


# -- running the CLI in-process ---------------------------------------------------------------------


def run(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin_stream = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    old_stdin = sys.stdin
    sys.stdin = stdin_stream
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path below ``roots``: files with their size and modification time, directories."""
    seen: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            seen.update({str(Path(dirpath) / d): ("dir",) for d in dirnames})
            for name in filenames:
                st_ = (Path(dirpath) / name).lstat()
                seen[str(Path(dirpath) / name)] = (st_.st_size, st_.st_mtime_ns)
    return seen


def check(code: int, stdout: str, stderr: str, argv) -> None:
    assert "Traceback" not in stderr and "Traceback" not in stdout, (argv, stderr)
    assert "internal error" not in stderr, (argv, stderr)
    if code != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (argv, stderr)
        assert lines[0].startswith("dgemma: error:"), (argv, stderr)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory and home the CLI may not write to, and an offline Hub."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DGEMMA_MODEL", "")
    monkeypatch.delenv("DGEMMA_HISTORY", raising=False)
    monkeypatch.chdir(work)
    return tmp_path


def unchanged_except(before: dict, after: dict, allowed: list[Path]) -> None:
    allowed_s = [str(a) for a in allowed]
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    stray = [p for p in changed if not any(p == a or p.startswith(a + os.sep) for a in allowed_s)]
    assert not stray, stray


# -- properties -------------------------------------------------------------------------------------


@fuzz(150)
@given(flags=SAMPLING_FLAGS, prompt=mostly(st.text(min_size=1, max_size=30).map(str.encode), st.binary(max_size=40)),
       via_stdin=st.booleans(), events=st.booleans())
def test_generate_exits_cleanly_whatever_the_flags_and_prompt_bytes(checkpoint, sandbox, flags, prompt, via_stdin,
                                                                     events):
    count("generate")
    events_path = sandbox / "work" / "events.jsonl"
    # Small defaults first: a fuzzed flag given later overrides them (the last occurrence wins).
    argv = ["generate", "--model", str(checkpoint), "--steps", "2", "--max-tokens", "16", *flags]
    if events:
        argv += ["--events", str(events_path)]
    if via_stdin:
        argv.append("-")
    else:
        argv.append(os.fsdecode(prompt))  # undecodable bytes arrive as lone surrogates, as in sys.argv
    before = snapshot(sandbox)
    code, out, err = run(argv, stdin=prompt if via_stdin else b"")
    check(code, out, err, argv)
    count("generate: exit 0" if code == 0 else "generate: one-line error")
    unchanged_except(before, snapshot(sandbox), [events_path])


@fuzz(100)
@given(kind=st.sampled_from(["config", "weights", "file", "empty", "tokenizer"]), data=config_json(),
       blob=st.binary(max_size=64))
def test_a_random_model_directory_is_a_one_line_error(checkpoint, sandbox, kind, data, blob):
    count("model")
    model = sandbox / "work" / "model"
    if model.is_dir():
        for f in model.iterdir():
            f.unlink()
        model.rmdir()
    elif model.exists():
        model.unlink()
    if kind == "file":
        model.write_bytes(blob)
    else:
        model.mkdir()
        if kind in ("config", "weights"):  # random JSON as the config / random bytes as the weights
            config = data if kind == "config" else json.loads((checkpoint / "config.json").read_text())
            (model / "config.json").write_text(json.dumps(config))
        if kind == "weights":
            (model / "model.safetensors").write_bytes(blob)
        if kind == "tokenizer":  # a working model with random bytes as tokenizer.json
            for f in checkpoint.iterdir():
                if f.name != "tokenizer.json":
                    (model / f.name).symlink_to(f)
            (model / "tokenizer.json").write_bytes(blob)
    argv = ["generate", "--model", str(model), "--steps", "1", "--max-tokens", "4", "hi"]
    before = snapshot(sandbox)
    code, out, err = run(argv)
    check(code, out, err, argv)
    assert code != 0
    unchanged_except(before, snapshot(sandbox), [])


@fuzz(60)
@given(lines=st.lists(st.one_of(
    st.tuples(st.sampled_from(["steps", "max_tokens", "seed", "t_min", "t_max", "temp", "entropy_bound",
                               "confidence_threshold", "stability_threshold", "bogus"]),
              st.one_of(small_int, big_int, number, junk)).map(lambda kv: f"/params {kv[0]}={kv[1]}"),
    st.text(max_size=20).map(lambda t: "/params " + t),
    st.sampled_from(["/think on", "/think hide", "/system be brief", "/stats", "/reset", "/nope"]),
), max_size=4), message=st.text(min_size=1, max_size=12))
def test_chat_params_never_break_the_next_message(checkpoint, sandbox, lines, message):
    count("chat")
    script = "\n".join(lines + ["/params steps=2 max_tokens=16", message.replace("\n", " "), "/exit"]) + "\n"
    argv = ["chat", "--model", str(checkpoint), "--steps", "2", "--max-tokens", "16"]
    before = snapshot(sandbox)
    code, out, err = run(argv, stdin=script.encode("utf-8", "surrogateescape"))
    assert code == 0, err
    assert "Traceback" not in out + err and "internal error" not in out + err
    for line in out.splitlines():  # every error the REPL reports is one line
        if line.startswith("error:"):
            assert line.strip() != "error:"
    unchanged_except(before, snapshot(sandbox), [])


@fuzz(100)
@given(argv=st.lists(st.one_of(st.sampled_from(
    ["generate", "chat", "convert", "--help", "-h", "--version", "--hf-path", "--mlx-path", "-q", "--q-bits",
     "--q-group-size", "--dtype", "--force", "--steps", "--seed", "--model", "-m", "--", "-"]), junk), max_size=6))
def test_any_argument_list_exits_cleanly(sandbox, argv):
    count("argv")
    before = snapshot(sandbox)
    code, out, err = run(argv)
    check(code, out, err, argv)
    count("argv: exit 0" if code == 0 else "argv: one-line error")
    if argv and argv[0] == "convert":  # a conversion may only write its own --mlx-path
        named = [Path(argv[i + 1]).resolve() for i, a in enumerate(argv[:-1]) if a == "--mlx-path"]
        unchanged_except(before, snapshot(sandbox), named)
    else:
        unchanged_except(before, snapshot(sandbox), [])
