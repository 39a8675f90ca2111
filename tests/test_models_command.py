"""`dgemma models`: the bundled models and the DiffusionGemma checkpoints of the Hugging Face cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import tiny


def run_models(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "dgemma_mlx", "models"], capture_output=True, text=True, env=env, timeout=120)


def test_models_lists_diffusion_gemma_checkpoints_of_the_hf_cache(checkpoint, tmp_path):
    hub = tmp_path / "hub"
    tiny.install_in_hf_cache(checkpoint, hub, "someone/tiny-diffusiongemma")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tiny.install_in_hf_cache(other, hub, "someone/a-llama")
    result = run_models({"HF_HUB_CACHE": str(hub)})
    assert result.returncode == 0, result.stderr
    assert "someone/tiny-diffusiongemma" in result.stdout
    assert "a-llama" not in result.stdout
    assert "no DiffusionGemma checkpoint" not in result.stdout


def test_models_lines_are_not_wrapped_when_piped_and_an_empty_cache_is_said(tmp_path):
    result = run_models({"HF_HUB_CACHE": str(tmp_path / "missing"), "COLUMNS": "40"})
    lines = result.stdout.splitlines()
    assert lines[1].startswith("  ") and "completion and infilling" in lines[1]  # one line per description
    assert lines[-1] == "(no DiffusionGemma checkpoint in the Hugging Face cache)"


def test_models_works_with_no_hf_cache(tmp_path):
    result = run_models({"HF_HUB_CACHE": str(tmp_path / "missing")})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
