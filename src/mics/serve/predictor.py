"""One run's model loaded once for the web page: uploaded bytes in, prediction and pictures out.

Uploads are decoded by the same code as training and ``mics predict`` (:func:`mics.data.validate.load_rgb`,
centre square crop, bilinear resize), so a bad upload gets the same reason a bad training image would.
"""

from __future__ import annotations

import io
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mics.data.validate import check_image

THUMBNAIL = 256  # px, longest side of the uploaded image as shown on the page


class UploadError(ValueError):
    """An upload that cannot be used; the message is shown on the page."""


@dataclass
class Upload:
    field: str  # form field: "image" or "partner"
    filename: str
    data: bytes


@dataclass
class Prediction:
    classes: list[str]
    probabilities: list[float]
    uncertainty: float
    flagged: bool | None  # None when the run has no threshold
    image_png: bytes  # the upload, downsized for display
    model_input_png: bytes  # what the model sees (S x S)
    partner_png: bytes | None  # the partner the model saw (S x S): generated or uploaded
    partner_source: str | None  # "generated" | "uploaded" | None

    @property
    def predicted(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]


def png(array_or_image: np.ndarray | Image.Image) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_upload(upload: Upload, size: int) -> tuple[np.ndarray, bytes]:
    """(uint8 [size, size, 3] model input, PNG thumbnail of the upload) or UploadError saying why not."""
    from mics.data.cache import square_resize
    from mics.data.validate import load_rgb

    name = upload.filename or upload.field
    if not upload.data:
        raise UploadError(f"“{name}” is empty: choose an image file (JPEG, PNG, BMP, TIFF or WebP).")
    with tempfile.TemporaryDirectory(prefix="mics-serve-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(upload.data)
        reason = check_image(path)
        if reason is not None:
            raise UploadError(f"“{name}” cannot be used: {reason}.")
        # decoded exactly as for training (JPEG draft at the model size), the thumbnail separately
        model_input = square_resize(load_rgb(path, draft_size=size), size)
        thumb = load_rgb(path, draft_size=THUMBNAIL)
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))
    return model_input, png(thumb)


class Predictor:
    """The run's model (PyTorch or its ONNX export) behind a lock: the server answers on several threads."""

    def __init__(self, run_dir: Path, engine: str = "torch", threshold: float | None = None) -> None:
        import json

        from mics.config import load_yaml
        from mics.pipeline import RunError

        self.run_dir = Path(run_dir)
        if not (self.run_dir / "finetune" / "best.json").exists():
            raise RunError(
                f"{self.run_dir} has no fine-tuned MICS model (finetune/best); "
                "finish it with 'mics run' first"
            )
        self.meta: dict[str, Any] = json.loads((self.run_dir / "run.json").read_text(encoding="utf-8"))
        self.cfg = load_yaml(self.run_dir / "config.yaml")
        self.classes: list[str] = list(self.meta["classes"])
        self.modalities: list[str] = list(self.meta.get("modalities") or ["image", "partner"])
        self.size: int = self.cfg.data.image_size
        self.threshold = threshold
        self.engine = engine
        self.uses_partner = bool(self.cfg.finetune.use_nbi)
        self.generated = self.meta.get("pair", "virtual-nbi") == "virtual-nbi"
        self._lock = threading.Lock()
        if engine == "onnx":
            from mics.onnx_predict import OnnxModel

            path = self.run_dir / "model.onnx"
            if not path.is_file():
                raise RunError(
                    f"{path} does not exist; write it with 'mics export --run {self.run_dir}' first"
                )
            try:
                self._onnx = OnnxModel(path)
            except ImportError:
                raise RunError("the onnx engine needs onnxruntime: pip install 'mics[export]'") from None
            except ValueError as err:
                raise RunError(f"{err}; write it again with 'mics export --run {run_dir}'") from None
        elif engine == "torch":
            import torch

            from mics.nbi import get_generator
            from mics.pipeline import load_finetuned

            self._model, _ = load_finetuned(self.run_dir, torch.device("cpu"))
            self._generator = get_generator(self.cfg.data.generator)
        else:
            raise RunError(f"unknown engine {engine!r}; choose 'torch' or 'onnx'")

    @property
    def needs_partner(self) -> bool:
        """Whether each upload needs its partner image (runs trained on real pairs)."""
        return self.uses_partner and not self.generated

    @property
    def accepts_partner(self) -> bool:
        """Whether a partner upload is used (the ONNX graph of a generated-partner run takes none)."""
        return self.uses_partner and (self.engine == "torch" or not self.generated)

    def predict(self, image: Upload, partner: Upload | None = None) -> Prediction:
        a, thumb = decode_upload(image, self.size)
        b = None
        if partner is not None and partner.data and self.accepts_partner:
            b, _ = decode_upload(partner, self.size)
        if self.needs_partner and b is None:
            raise UploadError(
                f"This model was trained on {self.modalities[0]} + {self.modalities[1]} pairs: "
                f"add the {self.modalities[1]} image of the same lesion."
            )
        source = "uploaded" if b is not None else ("generated" if self.uses_partner else None)
        with self._lock:
            probs, u, shown = self._run(a, b)
        flagged = None if self.threshold is None else bool(u > self.threshold)
        return Prediction(
            self.classes,
            [float(p) for p in probs],
            float(u),
            flagged,
            thumb,
            png(a),
            png(shown) if shown is not None else None,
            source,
        )

    def _run(self, a: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, float, np.ndarray | None]:
        if self.engine == "onnx":
            out = self._onnx.predict(a[None], b[None] if b is not None else None)
            shown = out["generated_partner"][0] if "generated_partner" in out else b
            return out["probabilities"][0], float(out["uncertainty"][0]), shown
        import torch

        from mics.data.views import to_float

        if b is None and self.uses_partner:
            b = self._generator(a[None])[0]

        def tensor(x: np.ndarray) -> torch.Tensor:
            return to_float(torch.from_numpy(np.array(x[None])).permute(0, 3, 1, 2).contiguous())

        pred = self._model.predict(tensor(a), tensor(b) if b is not None and self.uses_partner else None)
        return pred.probs[0].numpy(), float(pred.uncertainty[0]), b
