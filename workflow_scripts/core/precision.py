"""Mixed-precision training (compute.amp): autocast of the forward pass and the matching optimizer step."""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_mode(config: dict) -> str:
    """compute.amp: float32 (absent: no mixed precision), bf16 or fp16 autocast of the forward pass."""
    return config["compute"].get("amp", "float32")


class Precision:
    """Forward under autocast (bf16 / fp16) and the matching backward + clipped optimizer step; fp16 scales the
    loss with a GradScaler (gradients unscaled before clipping, steps with inf/NaN gradients skipped). float32
    runs exactly the former code (no autocast context at all), so its results are unchanged bit for bit."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in ("float32", *AMP_DTYPES):
            raise ValueError(f"compute.amp must be float32, bf16 or fp16, got {mode!r}")
        self.mode, self.device = mode, device
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self):
        if self.mode == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.mode])

    def step(self, loss: torch.Tensor, model: torch.nn.Module, optimizer, grad_clip: float) -> None:
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
