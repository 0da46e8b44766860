"""Optical-flow file formats: Middlebury ``.flo``, ``.pfm`` and KITTI's 16-bit PNG.

Flow arrays are ``(H, W, 2)`` float32 with ``u`` (rightwards) then ``v`` (downwards), in pixels.
Every reader checks the header and the file length, so a truncated download or a wrong file
raises an error that names the file instead of returning garbage.

* ``.flo`` (Middlebury; FlyingChairs, Sintel, and Sintel submissions): the float32 magic
  202021.25 (the bytes ``PIEH``), int32 width, int32 height, then ``u, v`` interleaved per pixel,
  row by row, all little-endian.
* ``.pfm`` (FlyingThings3D): a text header ``PF`` (3 channels) or ``Pf`` (1 channel), ``width
  height``, and a scale whose sign gives the byte order (negative: little-endian); rows are
  stored bottom to top. Things stores flow as 3 channels, the third one zero.
* KITTI PNG (KITTI-2015, HD1K, and KITTI submissions): 16-bit RGB with ``u = (R - 2**15) / 64``,
  ``v = (G - 2**15) / 64`` and ``B`` = 1 where the flow is valid (sparse ground truth).
  Neither PIL nor torchvision writes 16-bit RGB PNGs, so :func:`write_kitti_png` encodes the PNG
  itself (a few lines of ``zlib``); reading goes through ``torchvision.io.decode_png`` (PIL would
  drop the low 8 bits).
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_png, read_file

FLO_MAGIC = b"PIEH"  # the float32 202021.25, little-endian
KITTI_OFFSET = 2**15
KITTI_SCALE = 64.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FlowFormatError(ValueError):
    """A flow file is malformed (wrong magic, truncated, unexpected shape)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def _check_flow(flow: np.ndarray, what: str) -> np.ndarray:
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"{what} expects a flow of shape (H, W, 2), got {flow.shape}")
    return flow


# ----------------------------------------------------------------------------------------------
# Middlebury .flo
# ----------------------------------------------------------------------------------------------


def read_flo(path: str | Path) -> np.ndarray:
    """Read a Middlebury ``.flo`` file as ``(H, W, 2)`` float32."""
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != FLO_MAGIC:
        raise FlowFormatError(path, "not a .flo file (the first 4 bytes must be 'PIEH')")
    w, h = struct.unpack("<ii", data[4:12])
    if w <= 0 or h <= 0:
        raise FlowFormatError(path, f"invalid size {w}x{h} in the .flo header")
    expected = 12 + 8 * w * h
    if len(data) != expected:
        raise FlowFormatError(
            path, f"{len(data)} bytes but a {w}x{h} .flo file has {expected}; truncated?"
        )
    return np.frombuffer(data, "<f4", offset=12).reshape(h, w, 2).astype(np.float32)


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """Write ``(H, W, 2)`` flow as a Middlebury ``.flo`` file (the Sintel submission format)."""
    flow = _check_flow(flow, "write_flo")
    h, w = flow.shape[:2]
    Path(path).write_bytes(
        FLO_MAGIC + struct.pack("<ii", w, h) + np.ascontiguousarray(flow, "<f4").tobytes()
    )


# ----------------------------------------------------------------------------------------------
# PFM
# ----------------------------------------------------------------------------------------------


def read_pfm(path: str | Path) -> np.ndarray:
    """Read a ``.pfm`` file as ``(H, W)`` or ``(H, W, 3)`` float32, top row first."""
    with open(path, "rb") as f:
        kind = f.readline().strip()
        if kind not in (b"PF", b"Pf"):
            raise FlowFormatError(path, "not a PFM file (the header must start with PF or Pf)")
        try:
            w, h = (int(t) for t in f.readline().split())
            scale = float(f.readline().strip())
        except ValueError:
            raise FlowFormatError(
                path, "malformed PFM header (want 'width height' and a scale)"
            ) from None
        channels = 3 if kind == b"PF" else 1
        data = f.read()
    dtype = "<f4" if scale < 0 else ">f4"
    expected = 4 * w * h * channels
    if len(data) != expected:
        raise FlowFormatError(
            path, f"{len(data)} data bytes but a {w}x{h}x{channels} PFM has {expected}; truncated?"
        )
    shape = (h, w, 3) if channels == 3 else (h, w)
    return np.flipud(np.frombuffer(data, dtype).reshape(shape)).astype(np.float32)


def write_pfm(path: str | Path, array: np.ndarray) -> None:
    """Write ``(H, W)`` or ``(H, W, 3)`` float32 as a little-endian PFM (bottom row first)."""
    array = np.asarray(array, np.float32)
    if array.ndim == 2:
        kind = b"Pf"
    elif array.ndim == 3 and array.shape[2] == 3:
        kind = b"PF"
    else:
        raise ValueError(f"write_pfm expects (H, W) or (H, W, 3), got {array.shape}")
    h, w = array.shape[:2]
    header = kind + b"\n" + f"{w} {h}\n-1.0\n".encode()
    Path(path).write_bytes(header + np.ascontiguousarray(np.flipud(array), "<f4").tobytes())


# ----------------------------------------------------------------------------------------------
# KITTI 16-bit PNG
# ----------------------------------------------------------------------------------------------


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def write_png_rgb16(path: str | Path, rgb: np.ndarray) -> None:
    """Write ``(H, W, 3)`` uint16 as a 16-bit RGB PNG (no filtering, zlib level 6)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint16:
        raise ValueError(f"write_png_rgb16 expects (H, W, 3) uint16, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    rows = np.ascontiguousarray(rgb, ">u2").view(np.uint8).reshape(h, w * 6)
    scanlines = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter type 0
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bit, colour type 2 (RGB)
    Path(path).write_bytes(
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def read_png_rgb16(path: str | Path) -> np.ndarray:
    """Read a 16-bit RGB PNG as ``(H, W, 3)`` int32 (exact values, no rescaling)."""
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its image decoders deprecated (moving to TorchCodec), but it
            # is the exact 16-bit reader at hand: PIL reads 16-bit RGB as 8-bit.
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except RuntimeError as e:
        raise FlowFormatError(path, f"cannot decode the PNG ({e})") from None
    if img.dtype != torch.uint16 or img.shape[0] != 3:
        raise FlowFormatError(
            path,
            f"a KITTI flow PNG is 16-bit RGB, got {img.shape[0]} channel(s) of {img.dtype}",
        )
    return img.to(torch.int32).permute(1, 2, 0).numpy()


def read_kitti_png(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read KITTI-format flow: ``(H, W, 2)`` float32 flow and an ``(H, W)`` bool valid mask."""
    raw = read_png_rgb16(path)
    flow = (raw[..., :2].astype(np.float32) - KITTI_OFFSET) / KITTI_SCALE
    return flow, raw[..., 2] > 0


def write_kitti_png(path: str | Path, flow: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Write flow in the KITTI format (the KITTI submission format); ``valid`` defaults to all."""
    flow = _check_flow(flow, "write_kitti_png")
    h, w = flow.shape[:2]
    # Round to the nearest 1/64 px; the format spans about +-512 px.
    uv = np.clip(np.rint(flow * KITTI_SCALE + KITTI_OFFSET), 0, 2**16 - 1)
    ok = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    if ok.shape != (h, w):
        raise ValueError(f"valid mask of shape {ok.shape} does not match the flow's {(h, w)}")
    write_png_rgb16(path, np.dstack([uv, ok]).astype(np.uint16))


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def read_flow(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read any ground-truth flow by suffix: ``(flow (H, W, 2), valid (H, W) or None)``.

    Only KITTI PNGs carry a valid mask; the dense formats return ``None``.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".flo":
        return read_flo(path), None
    if suffix == ".pfm":
        data = read_pfm(path)
        if data.ndim != 3:
            raise FlowFormatError(path, "a flow PFM needs 3 channels (u, v and an unused one)")
        return np.ascontiguousarray(data[..., :2]), None
    if suffix == ".png":
        return read_kitti_png(path)
    raise FlowFormatError(path, "unknown flow format; expected .flo, .pfm or a KITTI .png")


def check_flow_header(path: str | Path) -> None:
    """A cheap check of a flow file (``data.verify=quick``): its header and its length, without
    reading the data (a ``.flo`` / ``.pfm``), or the PNG's chunks (KITTI)."""
    path = Path(path)
    size = path.stat().st_size
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        if suffix == ".flo":
            head = f.read(12)
            if len(head) < 12 or head[:4] != FLO_MAGIC:
                raise FlowFormatError(path, "not a .flo file (the first 4 bytes must be 'PIEH')")
            w, h = struct.unpack("<ii", head[4:12])
            expected = 12 + 8 * w * h
        elif suffix == ".pfm":
            kind = f.readline().strip()
            if kind not in (b"PF", b"Pf"):
                raise FlowFormatError(path, "not a PFM file (the header must start with PF or Pf)")
            try:
                w, h = (int(t) for t in f.readline().split())
                float(f.readline().strip())
            except ValueError:
                raise FlowFormatError(path, "malformed PFM header") from None
            expected = f.tell() + 4 * w * h * (3 if kind == b"PF" else 1)
        elif suffix == ".png":
            with Image.open(f) as img:
                img.verify()
            return
        else:
            raise FlowFormatError(path, "unknown flow format; expected .flo, .pfm or a KITTI .png")
    if w <= 0 or h <= 0 or size != expected:
        raise FlowFormatError(
            path, f"{size} bytes but a {w}x{h} {suffix} file has {expected}; truncated?"
        )


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 (greyscale is repeated, alpha dropped)."""
    with Image.open(path) as img:
        if img.mode.startswith("I"):  # 16-bit greyscale: keep the top byte
            arr = (np.asarray(img, np.int32) >> 8).astype(np.uint8)
            return np.repeat(arr[..., None], 3, axis=2)
        return np.array(img.convert("RGB"), np.uint8)
