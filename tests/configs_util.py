"""Loads the repository's config files the way ``--config=configs/NAME.py`` does; runs the converter CLI; makes
test images."""

import importlib.util
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np

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


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 RGB with smooth structure and noise, so that every resampling weight shows in the pixels."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    waves = 60 * np.sin(x / 7.0 + seed) * np.cos(y / 5.0)
    return np.clip(127 + waves[..., None] + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
