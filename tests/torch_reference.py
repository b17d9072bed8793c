"""Helpers for parity tests against PyTorch models: non-trivial random weights and BN statistics.

Random-init models have zero biases, unit BN scales and (0, 1) running statistics, which would
leave whole code paths (biases, BN scale/shift, statistics) untested. ``randomize_`` gives every
bias, BN affine parameter and fusion weight random values, then recalibrates every BN's running
statistics on a batch (one forward in train mode with cumulative averaging), so activations stay
O(1) through deep networks and the statistics are genuinely data-dependent.
"""

from __future__ import annotations

import re

import numpy as np
import torch


def randomize_(model: torch.nn.Module, calibration_images: np.ndarray, seed: int = 0) -> torch.nn.Module:
    """In place; ``calibration_images`` NHWC float32. Returns the model in eval mode."""
    torch.manual_seed(seed)  # drop-path draws during calibration
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "edge_weights" in name or re.search(r"_merge\.\d+\.weight$", name):  # BiFPN fusion weights
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        for bn in norms:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) + 0.5)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch -> its statistics
        model.train()
        model(torch.from_numpy(calibration_images).permute(0, 3, 1, 2))
        for bn in norms:
            bn.momentum = 0.1
    return model.eval()


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().permute(0, 2, 3, 1).numpy()
