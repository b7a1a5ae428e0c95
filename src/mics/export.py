"""ONNX export of a finished MICS run: the whole inference graph in one file (``mics export``).

The graph takes uint8 RGB images [N, S, S, 3] (channels last, already centre-cropped and resized to the
run's ``data.image_size``, see :mod:`mics.onnx_predict`) and contains everything after that: scaling and
ImageNet normalisation, the virtual NBI partner when the run generated its partners, both encoders, the
fusion encoder, the heads and the evidential (TMC) combination. It goes through the model's own
``predict`` method, so whatever the model predicts with (combined opinion or classifier) is what is
exported.

Inputs: ``image`` and, for runs trained on real pairs, ``partner``. Outputs: ``probabilities`` [N, C],
``uncertainty`` [N] and, for runs with a generated partner, ``generated_partner`` (uint8, like ``image``). The
batch size is free; the image size is fixed. The run's classes, image size and preprocessing are stored
in the model's metadata (key ``mics``), read by :class:`mics.onnx_predict.OnnxModel`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mics import __version__
from mics.data.views import MEAN, STD, to_float
from mics.eval.threshold import read_threshold
from mics.nbi.virtual_torch import virtual_nbi_torch

EXPORT_FORMAT = 1  # bump when inputs, outputs or metadata change meaning
OPSET = 17
RUNNER_NAME = "predict_onnx.py"
PARITY_TOLERANCE = 1e-4  # max |probability difference| between the ONNX graph and the PyTorch model
# partner generators with a torch twin that traces into the graph (by ``data.generator`` name)
TORCH_GENERATORS: dict[str, Callable[[Tensor], Tensor]] = {"virtual-nbi": virtual_nbi_torch}

PartnerMode = Literal["generated", "input", "none"]


class ExportError(RuntimeError):
    """A run that cannot be exported as asked."""


@dataclass
class ExportResult:
    path: Path  # the .onnx file
    runner: Path | None  # the standalone predict script written next to it
    info: dict[str, Any]  # the metadata stored in the model
    max_abs_diff: float  # probabilities, ONNX vs PyTorch, on the check batch


class InferenceGraph(nn.Module):
    """uint8 [N, S, S, 3] image (and partner) -> probabilities, uncertainty (and generated partner), through
    the wrapped model's ``predict``."""

    def __init__(
        self, model: nn.Module, partner: PartnerMode, generator: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        super().__init__()
        if partner == "generated" and generator is None:
            raise ValueError("a generated partner needs a generator")
        self.model, self.partner, self.generator = model, partner, generator

    def forward(self, image: Tensor, partner: Tensor | None = None) -> tuple[Tensor, ...]:
        generated = None
        if self.partner == "generated":
            assert self.generator is not None
            generated = partner = self.generator(image)
        b = None
        if self.partner != "none":
            if partner is None:
                raise ValueError("this model needs the partner image")
            b = to_float(partner.permute(0, 3, 1, 2))
        pred = self.model.predict(to_float(image.permute(0, 3, 1, 2)), b)  # type: ignore[operator]
        outputs = (pred.probs.float(), pred.uncertainty.float())
        return (*outputs, generated) if generated is not None else outputs


def partner_mode(meta: dict[str, Any], uses_partner: bool) -> PartnerMode:
    """How the exported graph gets the second image: generated inside, given as input, or not used."""
    if not uses_partner:
        return "none"
    return "generated" if meta.get("pair", "virtual-nbi") == "virtual-nbi" else "input"


def _check_batch(size: int, n: int, seed: int = 0) -> np.ndarray:
    """A reproducible uint8 batch [n, size, size, 3] for tracing and the parity check: smooth colour
    gradients with noise (tissue-like), one dark frame (the generator's no-tissue branch)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    base = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[:, None] * ramp[None, :]), -1)
    batch = base[None] * rng.uniform(80, 255, (n, 1, 1, 3)) + rng.normal(0, 12, (n, size, size, 3))
    batch = np.clip(batch, 0, 255).astype(np.uint8)
    batch[-1] //= 40
    return batch


def export_onnx(
    run_dir: str | Path, out: str | Path | None = None, *, opset: int = OPSET, write_runner: bool = True
) -> ExportResult:
    """Export the selected model of ``run_dir`` to ``out`` (default RUN/model.onnx) and check it against
    the PyTorch model with onnxruntime; ``write_runner`` also writes ``predict_onnx.py`` next to it."""
    from mics.engine.checkpoint import atomic_write_text
    from mics.pipeline import RunError, load_finetuned

    run_dir = Path(run_dir)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise RunError(f"export needs {err.name}: pip install 'mics[export]'") from None
    if not (run_dir / "finetune" / "best.json").exists():
        raise RunError(
            f"{run_dir} has no fine-tuned MICS model (finetune/best); finish the run with 'mics run' first "
            "(baseline runs cannot be exported)"
        )
    out = Path(out) if out is not None else run_dir / "model.onnx"
    if out.suffix != ".onnx":
        raise RunError(f"--out {out}: give a file name ending in .onnx")
    if not out.parent.is_dir():
        raise RunError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    model, loaded = load_finetuned(run_dir, torch.device("cpu"))
    cfg, meta = loaded["cfg"], loaded["meta"]
    mode = partner_mode(meta, bool(getattr(model, "uses_partner", False)))
    generator = None
    if mode == "generated":
        generator = TORCH_GENERATORS.get(cfg.data.generator)
        if generator is None:
            raise RunError(
                f"the run generated its partners with {cfg.data.generator!r}, which has no torch version to "
                f"put in the graph (have: {', '.join(sorted(TORCH_GENERATORS))})"
            )
    graph = InferenceGraph(model, mode, generator).eval()
    size = cfg.data.image_size
    inputs = ["image"] + (["partner"] if mode == "input" else [])
    outputs = ["probabilities", "uncertainty"] + (["generated_partner"] if mode == "generated" else [])
    example = tuple(torch.from_numpy(_check_batch(size, 3, seed=i)) for i, _ in enumerate(inputs))
    info = {
        "format": EXPORT_FORMAT,
        "mics_version": __version__,
        "run": str(run_dir.resolve()),
        "method": meta.get("method", "mics"),
        "classes": list(meta["classes"]),
        "image_size": size,
        "partner": mode,
        "generator": cfg.data.generator if mode == "generated" else None,
        "inputs": {name: f"uint8 [N, {size}, {size}, 3] RGB" for name in inputs},
        "outputs": outputs,
        "preprocessing": (
            "EXIF orientation, 8-bit RGB, centre square crop on the short side, bilinear resize to "
            f"{size} x {size} (Pillow; JPEGs decoded with draft at >= {size} px); inside the graph: "
            "x / 255, minus mean, divided by std (ImageNet)"
        ),
        "mean": list(MEAN),
        "std": list(STD),
        "uncertainty": "TMC u = C / S" if cfg.finetune.use_tmc else "1 - max probability",
        "uncertainty_threshold": (read_threshold(run_dir) or {}).get("threshold"),
    }
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings():
        # the tracer warns about shape checks it freezes (image size and widths are fixed by design)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    _add_metadata(tmp, info)
    diff = check_parity(graph, tmp, [_check_batch(size, 4, seed=10 + i) for i, _ in enumerate(inputs)])
    if diff > PARITY_TOLERANCE:
        tmp.unlink()
        raise ExportError(
            f"the exported graph differs from the PyTorch model by {diff:.2e} in probability "
            f"(tolerance {PARITY_TOLERANCE:g}); please report this with the run's config.yaml"
        )
    tmp.replace(out)
    runner = None
    if write_runner:
        runner = out.with_name(RUNNER_NAME)
        source = Path(__file__).with_name("onnx_predict.py").read_text(encoding="utf-8")
        atomic_write_text(runner, source)
    return ExportResult(out, runner, info, diff)


def _add_metadata(path: Path, info: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mics", json.dumps(info)
    proto.producer_name, proto.producer_version = "mics", __version__
    onnx.save(proto, str(path))


@torch.no_grad()
def check_parity(graph: InferenceGraph, path: Path, inputs: list[np.ndarray]) -> float:
    """Max |probability difference| of the ONNX file at ``path`` vs ``graph`` on uint8 ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    onnx_probs = session.run(["probabilities"], dict(zip(names, inputs, strict=True)))[0]
    torch_probs = graph(*(torch.from_numpy(x) for x in inputs))[0].numpy()
    return float(np.abs(onnx_probs - torch_probs).max())
