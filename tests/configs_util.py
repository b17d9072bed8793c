"""Loads the repository's config files the way ``--config=configs/NAME.py`` does; runs the converter CLI."""

import importlib.util
import pathlib
import subprocess
import sys

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"configs.{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_convert(*args: str) -> subprocess.CompletedProcess:
    """``python -m scaledet_jax.convert ARGS`` from the repository root (output captured, 15 min limit)."""
    return subprocess.run(
        [sys.executable, "-m", "scaledet_jax.convert", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(CONFIG_DIR.parent),
    )
