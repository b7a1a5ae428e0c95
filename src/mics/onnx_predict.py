"""Predict with a model exported by ``mics export``, with NumPy, Pillow and onnxruntime only.

This file imports nothing from ``mics``: ``mics export`` copies it next to the ``.onnx`` file as
``predict_onnx.py``, so a machine without this package can run

    python predict_onnx.py model.onnx image1.jpg image2.png [--partner p1.jpg --partner p2.png]

and get the same JSON rows as ``mics predict`` (class, probabilities, uncertainty, or an error per image).

Preprocessing, identical to training and to ``mics predict`` (docs/deploy.md):

1. decode with Pillow (JPEG, PNG, BMP, TIFF, WebP, GIF); JPEGs are decoded at the smallest DCT scale
   that keeps both sides >= ``image_size`` (``Image.draft``), as the training cache does;
2. apply the EXIF orientation; convert to 8-bit RGB (alpha composited on black, 16-bit scaled);
3. crop the centred square on the short side, resize to ``image_size`` x ``image_size`` (bilinear);
4. feed uint8 [N, S, S, 3] (RGB, channels last) to the graph. Scaling to [0, 1], ImageNet mean/std
   normalisation and, for runs trained with generated partners, the virtual NBI partner are inside
   the graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

METADATA_KEY = "mics"
MAX_PIXELS = 8192 * 8192  # as mics.data.validate: refuse absurd headers before allocating
Image.init()
FORMATS: tuple[str, ...] = tuple(
    f for f in ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "GIF") if f in Image.OPEN
)


class ImageError(ValueError):
    """A file that cannot be used as an input image (the message says why, without the path)."""


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(finite.min(initial=0.0)), float(finite.max(initial=0.0))
        if hi <= 1.0 and lo >= 0.0:
            return np.round(finite * 255.0).astype(np.uint8)
        span = hi - lo if hi > lo else 1.0
        return np.round((finite - lo) / span * 255.0).astype(np.uint8)
    values = array.astype(np.int64)
    if values.max(initial=0) > 255:
        values = values // 257
    return np.clip(values, 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return image
        mode = "RGBA"
    if mode in ("LA", "La"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "RGBX"):
        if mode == "RGBX":
            return image.convert("RGB")
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    raise ImageError(f"unsupported pixel mode {mode!r}")


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block only loses the orientation
        return image


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """Centre square crop (short side), bilinear resize: RGB image -> uint8 [size, size, 3]."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image file -> uint8 [size, size, 3] as the model expects; ImageError says why not."""
    try:
        with Image.open(path, formats=FORMATS) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"image too large (more than {MAX_PIXELS} pixels)")
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (size, size))
            image.load()
            rgb = _to_rgb(_upright(image))
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except UnidentifiedImageError:
        raise ImageError("not an image, or a format other than JPEG/PNG/BMP/TIFF/WebP/GIF") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image too large (more than {MAX_PIXELS} pixels)") from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError) as err:
        raise ImageError(f"corrupt or truncated image data ({type(err).__name__}: {err})") from None
    return square_resize(rgb, size)


class OnnxModel:
    """An exported run: ``info`` (classes, image size, inputs, preprocessing) and :meth:`predict`."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise ValueError(f"{path}: cannot load it as an ONNX model ({err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ValueError(f"{path} was not written by 'mics export' (no {METADATA_KEY!r} metadata)")
        self.info: dict[str, Any] = json.loads(meta[METADATA_KEY])
        self.classes: list[str] = list(self.info["classes"])
        self.image_size: int = int(self.info["image_size"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def needs_partner(self) -> bool:
        """Whether each image needs its partner image (runs trained on real pairs)."""
        return "partner" in self.input_names

    def predict(self, images: np.ndarray, partners: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """uint8 [N, S, S, 3] (and partners, when needed) -> ``probabilities`` [N, C], ``uncertainty``
        [N] and, for runs with a generated partner, ``generated_partner`` uint8 [N, S, S, 3]."""
        feeds = {"image": np.ascontiguousarray(images, dtype=np.uint8)}
        if self.needs_partner:
            if partners is None:
                raise ValueError("this model was trained on real pairs: give each image's partner")
            feeds["partner"] = np.ascontiguousarray(partners, dtype=np.uint8)
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs, strict=True))

    def predict_files(
        self, images: Sequence[str | Path], partners: Sequence[str | Path] | None = None
    ) -> list[dict[str, Any]]:
        """One row per image, as ``mics predict`` prints them; unreadable images get an ``error``."""
        if partners and len(partners) != len(images):
            raise ValueError(f"got {len(images)} images but {len(partners)} partners; give one per image")
        if self.needs_partner and not partners:
            raise ValueError("this model was trained on real pairs: give each image's partner (--partner)")
        rows: list[dict[str, Any]] = []
        ready: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        for i, path in enumerate(images):
            partner = partners[i] if partners else None
            rows.append({"image": str(path), "partner": str(partner) if partner is not None else None})
            current = path
            try:
                a = load_image(path, self.image_size)
                current = partner if partner is not None else path
                b = load_image(partner, self.image_size) if partner is not None else None
            except ImageError as err:
                rows[i]["error"] = f"{current}: {err}"
                continue
            ready.append((i, a, b))
        if not ready:
            return rows
        out = self.predict(
            np.stack([r[1] for r in ready]),
            np.stack([r[2] for r in ready if r[2] is not None]) if self.needs_partner else None,
        )
        for j, (i, _, _) in enumerate(ready):
            probs = [float(p) for p in out["probabilities"][j]]
            rows[i].update(
                {
                    "class": self.classes[int(np.argmax(probs))],
                    "probabilities": {c: round(p, 6) for c, p in zip(self.classes, probs, strict=True)},
                    "uncertainty": round(float(out["uncertainty"][j]), 6),
                }
            )
        return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict with a model exported by 'mics export'.")
    parser.add_argument("model", help="the .onnx file")
    parser.add_argument("images", nargs="+", help="modality-A (e.g. white-light) images")
    parser.add_argument("--partner", action="append", help="partner image of each image, in order")
    args = parser.parse_args(argv)
    try:
        model = OnnxModel(args.model)
        rows = model.predict_files(args.images, args.partner)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
