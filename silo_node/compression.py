"""Compressing a silo's delta, with error feedback kept in the silo's data directory.

Error feedback (Seide et al. 2014; Karimireddy et al., ICML 2019, "Error Feedback Fixes
SignSGD"): what compression dropped from one round is added to the next round's delta
before compressing it, so nothing is lost for good, only delayed:

    corrected = delta + residual;  sent = C(corrected);  residual' = corrected - D(sent)

The residual is a function of deltas already noised by DP-SGD: post-processing, it
costs no privacy, and it never leaves the silo. It is stored as safetensors, mode
0600, replaced atomically, so it survives a restart; a residual whose tensors no longer
match the model (a new federation) is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from privacy import codec, compression

__all__ = ["RESIDUAL_FILE", "ErrorFeedback", "feedback_step"]

RESIDUAL_FILE = "compression_residual.safetensors"
Tensors = dict[str, torch.Tensor]


def feedback_step(kind: str, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
                  fraction: float) -> tuple[Tensors, Tensors]:
    """``(payload tensors, new residual)`` for ``delta`` with the previous ``residual``."""
    with torch.no_grad():
        corrected = {n: t + residual[n] if residual is not None else t.clone() for n, t in delta.items()}
        sent = compression.compress(kind, corrected, fraction)
        received = compression.decode(kind, sent, codec.Schema.of(corrected))
        return sent, {n: corrected[n] - received[n] for n in corrected}


class ErrorFeedback:
    """The residual file of one silo (``<data dir>/compression_residual.safetensors``)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / RESIDUAL_FILE

    def load(self, like: Mapping[str, torch.Tensor]) -> Tensors | None:
        """The stored residual, or None if there is none or it does not fit ``like``."""
        try:
            stored = codec.decode(self.path.read_bytes())
        except FileNotFoundError:
            return None
        if stored.keys() != like.keys() or any(stored[n].shape != t.shape or stored[n].dtype != t.dtype
                                               for n, t in like.items()):
            return None
        return stored

    def save(self, residual: Mapping[str, torch.Tensor]) -> None:
        """Replace the residual atomically; the file is created 0600 and fsynced."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(codec.encode(residual))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def compress(self, kind: str, delta: Mapping[str, torch.Tensor], fraction: float = 0.1) -> bytes:
        """The safetensors payload of ``kind`` for ``delta``; the new residual is saved first."""
        if kind == compression.KIND_DELTA:
            return codec.encode(delta)
        sent, residual = feedback_step(kind, delta, self.load(delta), fraction)
        self.save(residual)
        return codec.encode(sent)
