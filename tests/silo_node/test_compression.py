"""Error feedback at the silo: the residual accumulates exactly and survives a restart."""

from __future__ import annotations

import stat

import torch

from privacy import codec, compression
from silo_node.compression import RESIDUAL_FILE, ErrorFeedback


def test_topk_error_feedback_accumulates_the_residual_exactly_and_survives_a_restart(tmp_path) -> None:
    d1 = {"w": torch.tensor([3.0, 1.0, -0.5, 0.25])}
    sent = codec.decode(ErrorFeedback(tmp_path).compress("delta_topk", d1, 0.25))  # k = 1
    assert sent["indices.w"].tolist() == [0] and sent["values.w"].tolist() == [3.0]
    path = tmp_path / RESIDUAL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert codec.decode(path.read_bytes())["w"].tolist() == [0.0, 1.0, -0.5, 0.25]

    # A new process: the residual is read back and added before compressing.
    d2 = {"w": torch.tensor([0.5, 0.5, -1.0, 0.0])}  # corrected = [0.5, 1.5, -1.5, 0.25]
    sent = codec.decode(ErrorFeedback(tmp_path).compress("delta_topk", d2, 0.25))
    assert sent["indices.w"].tolist() == [1] and sent["values.w"].tolist() == [1.5]  # first of the ties by |.|
    residual = codec.decode(path.read_bytes())["w"]
    assert residual.tolist() == [0.5, 0.0, -1.5, 0.25]
    # Nothing is lost, only delayed: everything sent plus the residual is everything trained.
    total_sent = torch.tensor([3.0, 1.5, 0.0, 0.0])
    assert torch.equal(total_sent + residual, d1["w"] + d2["w"])


def test_int8_error_feedback_keeps_the_rounding_error(tmp_path) -> None:
    delta = {"w": torch.tensor([1.27, 0.004, -0.006])}  # scale 0.01: q = [127, 0, -1]
    fb = ErrorFeedback(tmp_path)
    sent = codec.decode(fb.compress("delta_int8", delta))
    received = compression.decode("delta_int8", sent, codec.Schema.of(delta))["w"]
    residual = fb.load(delta)["w"]
    assert sent["q.w"].tolist() == [127, 0, -1]
    assert torch.equal(received + residual, delta["w"])


def test_a_residual_of_another_model_is_ignored(tmp_path) -> None:
    fb = ErrorFeedback(tmp_path)
    fb.save({"other": torch.ones(2)})
    assert fb.load({"w": torch.zeros(2)}) is None
    sent = codec.decode(fb.compress("delta_topk", {"w": torch.tensor([1.0, 2.0])}, 0.5))
    assert sent["values.w"].tolist() == [2.0]
