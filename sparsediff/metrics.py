"""Error measures: attention output error (relative L1) and video PSNR/SSIM (torchmetrics)."""
from __future__ import annotations

import numpy as np
import torch


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """sum|out - ref| / sum|ref| in fp32, as a 0-dim tensor on the inputs' device (no host sync).

    Equal inputs give 0 (also when both are all zeros); a nonzero `out` against an all-zero
    `ref` gives inf.
    """
    if out.shape != ref.shape:
        raise ValueError(f"out: shape {tuple(out.shape)} does not match ref {tuple(ref.shape)}")
    ref32 = ref.float()
    num = (out.float() - ref32).abs().sum()
    den = ref32.abs().sum()
    return torch.where(den > 0, num / den, torch.where(num > 0, torch.full_like(num, float("inf")), num))


def _frames(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """(F, H, W, 3) or (H, W, 3) float pixels in [0, 1] -> fp32 (F, 3, H, W) tensor."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"{name}: expected frames (F, H, W, 3) or an image (H, W, 3), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected float pixels in [0, 1], got {t.dtype}")
    return t.float().permute(0, 3, 1, 2).contiguous()


def _pair(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _frames(a, "a"), _frames(b, "b")
    if ta.shape != tb.shape:
        raise ValueError(f"a: shape {tuple(ta.shape)} does not match b {tuple(tb.shape)} (as F, C, H, W)")
    return ta, tb.to(ta.device)


def video_psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB between two videos (F, H, W, 3) in [0, 1], from the MSE over all frames.

    inf when the videos are identical.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    ta, tb = _pair(a, b)
    if torch.equal(ta, tb):
        return float("inf")
    return float(peak_signal_noise_ratio(ta, tb, data_range=1.0))


def video_ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """SSIM between two videos (F, H, W, 3) in [0, 1]: the mean of per-frame SSIM (Gaussian window).

    The window is 11 pixels, shrunk (odd) for frames smaller than that.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    ta, tb = _pair(a, b)
    side = min(11, ta.shape[-2], ta.shape[-1])
    kernel = side if side % 2 else side - 1
    if kernel < 3:
        raise ValueError(f"a: frames of {ta.shape[-2]}x{ta.shape[-1]} are too small for SSIM (need >= 3x3)")
    # torchmetrics sizes a Gaussian window from sigma alone (1.5: 11 pixels), whatever kernel_size says:
    # scale sigma with the window, or frames under 6 pixels fail its padding.
    return float(structural_similarity_index_measure(ta, tb, data_range=1.0, kernel_size=kernel, sigma=1.5 * kernel / 11,
                                                     reduction="elementwise_mean"))
