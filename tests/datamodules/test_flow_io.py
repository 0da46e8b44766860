"""Flow file formats: round trips, independent readers, hand-made bytes, and malformed files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import _optical_flow as tv_flow
from torchvision.datasets.utils import _read_pfm as tv_read_pfm

from deq_lightning.datamodules.flow_io import (
    FlowFormatError,
    read_flo,
    read_flow,
    read_image,
    read_kitti_png,
    read_pfm,
    read_png_rgb16,
    write_flo,
    write_kitti_png,
    write_pfm,
)


@pytest.fixture
def flow() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(5, 7, 2)) * 40).astype(np.float32)


def test_flo_round_trip_matches_torchvision_reader(tmp_path: Path, flow: np.ndarray) -> None:
    path = tmp_path / "a.flo"
    write_flo(path, flow)
    assert np.array_equal(read_flo(path), flow)
    # torchvision's reader is independent code: our writer follows the format, not just itself.
    assert np.array_equal(tv_flow._read_flo(str(path)).transpose(1, 2, 0), flow)


def test_flo_header_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "b.flo"
    values = [1.5, -2.0, 3.25, 4.0]  # 2 x 1 pixels: (u, v) of pixel 0, then pixel 1
    path.write_bytes(
        struct.pack("<f", 202021.25) + struct.pack("<ii", 2, 1) + struct.pack("<4f", *values)
    )
    out = read_flo(path)
    assert out.shape == (1, 2, 2)
    assert out[0, 0].tolist() == [1.5, -2.0] and out[0, 1].tolist() == [3.25, 4.0]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"XXXX" + struct.pack("<ii", 2, 2), "PIEH"),
        (b"PIEH" + struct.pack("<ii", 2, 2) + b"\0" * 12, "truncated"),
        (b"PIEH" + struct.pack("<ii", -1, 2), "invalid size"),
    ],
)
def test_flo_malformed_names_the_file(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad.flo"
    path.write_bytes(payload)
    with pytest.raises(FlowFormatError, match=message) as err:
        read_flo(path)
    assert "bad.flo" in str(err.value)


@pytest.mark.parametrize("shape", [(4, 6, 3), (4, 6)])
def test_pfm_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    data = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    path = tmp_path / "a.pfm"
    write_pfm(path, data)
    assert np.array_equal(read_pfm(path), data)
    if len(shape) == 3:  # torchvision's reader keeps 2 channels, channel-first
        assert np.array_equal(tv_read_pfm(str(path)).transpose(1, 2, 0), data[..., :2])


def test_pfm_big_endian_bottom_row_first(tmp_path: Path) -> None:
    path = tmp_path / "be.pfm"
    # 1 channel, 2 x 2, positive scale = big-endian; rows stored bottom to top.
    path.write_bytes(b"Pf\n2 2\n1.0\n" + struct.pack(">4f", 1.0, 2.0, 3.0, 4.0))
    assert read_pfm(path).tolist() == [[3.0, 4.0], [1.0, 2.0]]


def test_pfm_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t.pfm"
    path.write_bytes(b"PF\n2 2\n-1.0\n" + b"\0" * 10)
    with pytest.raises(FlowFormatError, match="truncated"):
        read_pfm(path)


def test_kitti_png_round_trip(tmp_path: Path, flow: np.ndarray) -> None:
    valid = np.random.default_rng(2).random(flow.shape[:2]) > 0.4
    path = tmp_path / "000000_10.png"
    write_kitti_png(path, flow, valid)
    out, out_valid = read_kitti_png(path)
    assert np.abs(out - flow).max() <= 0.5 / 64 + 1e-6  # quantised to 1/64 px
    assert np.array_equal(out_valid, valid)


def test_kitti_png_encoding_by_hand(tmp_path: Path) -> None:
    """u, v = (value - 2**15) / 64; the third channel is the valid flag (decoded by torchvision,
    so the PNG we write is checked by an independent decoder)."""
    flow = np.array([[[0.0, 1.0], [-2.5, 100.0]]], np.float32)  # 1 x 2 pixels
    path = tmp_path / "f.png"
    write_kitti_png(path, flow, np.array([[True, False]]))
    raw = read_png_rgb16(path)
    assert raw.tolist() == [[[32768, 32832, 1], [32608, 39168, 0]]]
    assert Image.open(path).size == (2, 1)


def test_kitti_png_rejects_8bit(tmp_path: Path) -> None:
    path = tmp_path / "rgb8.png"
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(path)
    with pytest.raises(FlowFormatError, match="16-bit"):
        read_kitti_png(path)


def test_read_flow_dispatch(tmp_path: Path, flow: np.ndarray) -> None:
    write_flo(tmp_path / "a.flo", flow)
    write_pfm(tmp_path / "a.pfm", np.dstack([flow, np.zeros(flow.shape[:2], np.float32)]))
    write_kitti_png(tmp_path / "a.png", flow)
    dense, none = read_flow(tmp_path / "a.flo")
    assert none is None and np.array_equal(dense, flow)
    things, none = read_flow(tmp_path / "a.pfm")
    assert none is None and np.array_equal(things, flow)
    sparse, valid = read_flow(tmp_path / "a.png")
    assert valid.all() and np.abs(sparse - flow).max() < 0.01
    (tmp_path / "a.npy").write_bytes(b"")
    with pytest.raises(FlowFormatError, match="unknown flow format"):
        read_flow(tmp_path / "a.npy")


def test_read_image_greyscale_and_alpha(tmp_path: Path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and np.array_equal(out[..., 2], grey)
    rgba = np.full((2, 2, 4), 7, np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").shape == (2, 2, 3)
