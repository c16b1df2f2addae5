"""Images on the wire: numpy arrays <-> `in2n.v1.Image` messages, and the key of an original.

Shared by the server and the clients. Decoding validates everything it reads
and raises `ImageFormatError` with a message that names the field. `original_key` is the
server-checked hash of an original as it travels (the recipe is written in the .proto).
"""

from __future__ import annotations

import hashlib

import numpy as np

from protos.in2n.v1 import edit_service_pb2 as pb

_NUMPY_OF = {
    pb.DTYPE_UINT8: np.dtype(np.uint8),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
}
_PROTO_OF = {
    np.dtype(np.uint8): pb.DTYPE_UINT8,
    np.dtype(np.float16): pb.DTYPE_FLOAT16,
    np.dtype(np.float32): pb.DTYPE_FLOAT32,
}


class ImageFormatError(ValueError):
    """An `Image` message that does not describe a valid RGB image."""


def encode_image(image: np.ndarray) -> pb.Image:
    """[H, W, 3] uint8, float16 or float32 array -> `Image` (floats are sent as they are)."""
    if image.ndim != 3:
        raise ImageFormatError(f"image must be [H, W, C], got shape {tuple(image.shape)}")
    dtype = np.dtype(image.dtype)
    if dtype not in _PROTO_OF:
        raise ImageFormatError(f"image dtype must be uint8, float16 or float32, got {dtype}")
    h, w, c = image.shape
    data = np.ascontiguousarray(image, dtype=dtype.newbyteorder("<")).tobytes()
    return pb.Image(height=h, width=w, channels=c, dtype=_PROTO_OF[dtype], data=data)


def decode_image(msg: pb.Image, field: str, max_side: int = 2048, keep_uint8: bool = False) -> np.ndarray:
    """`Image` -> [H, W, 3] float32 in [0, 1], validated.

    Args:
        msg: the message.
        field: the request field it came from, named in errors ("render", "original").
        max_side: largest height or width accepted.
        keep_uint8: a uint8 image comes back as it travelled, [H, W, 3] uint8 in 0..255: a read-only
            view of the message's bytes, no copy, no conversion (the consumer converts where it is
            cheapest, e.g. on its GPU). Float images are float32 either way.
    """
    if msg.height == 0 or msg.width == 0:
        raise ImageFormatError(f"{field}: height and width must be positive, got {msg.height}x{msg.width}")
    if msg.height > max_side or msg.width > max_side:
        raise ImageFormatError(f"{field}: {msg.height}x{msg.width} exceeds the largest side accepted, {max_side}")
    if msg.channels != 3:
        raise ImageFormatError(f"{field}: channels must be 3 (RGB), got {msg.channels}")
    if msg.dtype not in _NUMPY_OF:
        name = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
        raise ImageFormatError(f"{field}: dtype must be DTYPE_UINT8, DTYPE_FLOAT16 or DTYPE_FLOAT32, got {name}")
    dtype = _NUMPY_OF[msg.dtype]
    expected = msg.height * msg.width * msg.channels * dtype.itemsize
    if len(msg.data) != expected:
        raise ImageFormatError(
            f"{field}: data has {len(msg.data)} bytes, expected {expected} "
            f"({msg.height}x{msg.width}x{msg.channels} {pb.DType.Name(msg.dtype)})"
        )
    array = np.frombuffer(msg.data, dtype=dtype).reshape(msg.height, msg.width, msg.channels)
    if dtype == np.uint8:
        return array if keep_uint8 else to_float01(array)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ImageFormatError(f"{field}: contains NaN or infinite values")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ImageFormatError(f"{field}: float values must lie in [0, 1], got [{array.min():.4g}, {array.max():.4g}]")
    return array


def to_float01(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 (0..255) or float in [0, 1] -> float32 in [0, 1] (uint8: x / 255)."""
    if image.dtype == np.uint8:  # one pass, same numbers as float32(x) / 255
        return np.divide(image, np.float32(255.0), dtype=np.float32)
    return np.asarray(image, dtype=np.float32)


def wire_image(image: np.ndarray, name: str) -> pb.Image:
    """[H, W, 3] uint8 / float16 / float32 (float64 is sent as float32) -> `Image`."""
    image = np.asarray(image)
    if image.dtype == np.float64:
        image = image.astype(np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be [H, W, 3], got shape {tuple(image.shape)}")
    try:
        return encode_image(image)
    except ImageFormatError as e:
        raise ValueError(f"{name}: {e}") from None


def original_key(original: np.ndarray) -> str:
    """Key of an original's content as it travels (shape, dtype and pixels): the same key means the same image.

    The server computes it again from the image it receives and refuses a request whose key does not match
    (INVALID_ARGUMENT naming original_key); so float64 is keyed as the float32 it is sent as, in little-endian order.
    """
    array = np.asarray(original)
    if array.dtype == np.float64:  # sent as float32 (see wire_image)
        array = array.astype(np.float32)
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{array.shape}|{array.dtype.str}|".encode())  # sha256: hardware-accelerated on most CPUs
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:32]


def wire_original_key(image: pb.Image) -> str:
    """`original_key` of an image as it travelled (its shape, dtype and bytes): what an honest client sends as
    `original_key` with it. `image` must have passed `decode_image`."""
    array = np.frombuffer(image.data, dtype=_NUMPY_OF[image.dtype]).reshape(image.height, image.width, image.channels)
    return original_key(array)
