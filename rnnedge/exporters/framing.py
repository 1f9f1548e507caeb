"""The weights of framing front-ends streamed as strided convolutions (``frontends``):
a ``torch.stft`` call's DFT basis times its window, and the convolution that carries a
(K, size) kernel at a stride."""

from __future__ import annotations

import math

import torch
from torch import nn


def stft_kernel(args: dict) -> tuple[torch.Tensor, int, dict]:
    """(the (2*bins, n_fft) DFT basis times the window, bins, options) of one stft call."""
    n = int(args["n_fft"])
    hop = int(args["hop_length"] or n // 4)
    win = int(args["win_length"] or n)
    window = args["window"]
    w = torch.ones(win, dtype=torch.float64) if window is None else \
        window.detach().to(torch.float64).reshape(-1)
    full = torch.zeros(n, dtype=torch.float64)
    left = (n - w.numel()) // 2
    full[left:left + w.numel()] = w
    onesided = args["onesided"] if args["onesided"] is not None else True  # real signal, window
    bins = n // 2 + 1 if onesided else n
    f = torch.arange(bins, dtype=torch.float64)[:, None]
    angle = 2 * math.pi * f * torch.arange(n, dtype=torch.float64)[None, :] / n
    sin = -torch.sin(angle)
    # DC and Nyquist have no imaginary part: exact zeros, as torch.stft gives (sin(pi*n)
    # is ~1e-15, whose sign would flip a phase).
    sin[(f.reshape(-1) == 0) | (2 * f.reshape(-1) == n)] = 0.0
    basis = torch.cat([torch.cos(angle), sin]) * full[None, :]
    if args["normalized"]:
        basis = basis / math.sqrt(n)
    return basis, bins, {"hop": hop, "center": bool(args["center"]),
                         "pad_mode": args["pad_mode"], "complex": args["return_complex"]}


def framing_conv(kernel: torch.Tensor, step: int, conv2d: bool) -> nn.Module:
    """The strided convolution with ``kernel`` (K, size) as its weights, no bias."""
    k, size = kernel.shape
    if conv2d:
        m = nn.Conv2d(1, k, (1, size), stride=(1, step), bias=False)
        weight = kernel.reshape(k, 1, 1, size)
    else:
        m = nn.Conv1d(1, k, size, stride=step, bias=False)
        weight = kernel.reshape(k, 1, size)
    m.weight = nn.Parameter(weight.to(torch.float32), requires_grad=False)
    return m.eval()
