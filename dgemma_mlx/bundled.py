"""The small models shipped inside the package, and the DiffusionGemma checkpoints in the Hugging
Face cache: what ``--model NAME`` can name without a download, and what ``dgemma models`` lists.

The bundled models were trained from scratch by the recipes in ``recipes/`` (DiffusionGemma's
architecture, small): they run offline on any machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MODELS_DIR = Path(__file__).parent / "models"

DESCRIPTIONS = {
    "pycode": "Python code, trained from scratch on the standard library (recipes/code): completion and infilling",
    "sudoku": "Sudoku solver, trained from scratch (recipes/sudoku): `dgemma sudoku`",
}


@dataclass
class Entry:
    name: str  # what --model takes
    path: Path
    description: str
    size_bytes: int
    source: str  # "bundled" or "hf-cache"


def bundled_names() -> list[str]:
    return sorted(n for n in DESCRIPTIONS if (MODELS_DIR / n / "config.json").is_file())


def bundled_path(name: str) -> Optional[Path]:
    """The directory of the bundled model ``name``, or None."""
    path = MODELS_DIR / name
    return path if name in DESCRIPTIONS and (path / "config.json").is_file() else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _is_diffusion_gemma(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("model_type") == "diffusion_gemma"
    except (OSError, ValueError, AttributeError):
        return False


def cached_checkpoints() -> list[Entry]:
    """DiffusionGemma repositories in the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            config = Path(rev.snapshot_path) / "config.json"
            if _is_diffusion_gemma(config):
                out.append(Entry(repo.repo_id, Path(rev.snapshot_path), "Hugging Face cache", repo.size_on_disk, "hf-cache"))
                break
    return out


def list_models() -> list[Entry]:
    bundled = [Entry(n, MODELS_DIR / n, DESCRIPTIONS[n], _size(MODELS_DIR / n), "bundled") for n in bundled_names()]
    return bundled + cached_checkpoints()
