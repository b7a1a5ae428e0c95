"""``predict_files`` (``mics predict``) against the evaluation path, image by image, on a finished run.

The run is on the bundled GI images, whose partner is generated (virtual NBI), so ``predict_files``
without ``partners`` must generate the same partner as the cache did; with ``partners`` given, any image
can stand as the second modality, which makes the order of the two inputs visible.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mics import pipeline
from mics.config import dump_yaml, load_yaml, preset
from mics.data.views import to_float
from mics.engine.checkpoint import load_checkpoint, save_checkpoint
from mics.eval.metrics import classification_metrics
from mics.methods.finetune import Prediction
from mics.predict import predict_files
from tests.conftest import GI, run_folder

SMOKE = preset("smoke")
CFG = replace(
    SMOKE,
    pretrain=replace(SMOKE.pretrain, epochs=1),
    finetune=replace(SMOKE.finetune, epochs=1, min_steps_per_epoch=2),
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = run_folder(tmp_path_factory, "predict")
    if (run_dir / "metrics.json").exists():  # kept from an earlier session (MICS_TEST_RUN_CACHE)
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    else:
        metrics = pipeline.run(GI, run_dir, cfg=CFG, labels=0.2, seed=2)
    ctx = pipeline.open_run(run_dir)
    test = np.asarray(ctx.split.test)
    samples = [ctx.images.samples[i] for i in test]
    return {
        "run_dir": run_dir,
        "metrics": metrics,
        "ctx": ctx,
        "test": test,
        "images": [s.path_a for s in samples],
        # another test image as each one's partner
        "partners": [samples[(i + 1) % len(samples)].path_a for i in range(len(samples))],
    }


def _probs(rows: list[dict[str, Any]], classes: list[str]) -> np.ndarray:
    return np.array([[r["probabilities"][c] for c in classes] for r in rows])


def test_predict_matches_the_evaluation_path_per_image(finished):
    ctx = finished["ctx"]
    classes = list(ctx.images.classes)
    rows = predict_files(finished["run_dir"], finished["images"], device="cpu")
    assert [r["image"] for r in rows] == [str(p) for p in finished["images"]]
    assert all("error" not in r for r in rows)
    model, _ = pipeline.load_finetuned(finished["run_dir"], torch.device("cpu"))
    probs, unc, _ = pipeline.predict_arrays(
        model, ctx.arrays_a, ctx.arrays_b, finished["test"], torch.device("cpu")
    )
    # the same images, decoded the same way, through the same model: the same numbers (rounded to 6 places)
    np.testing.assert_allclose(_probs(rows, classes), probs, atol=2e-6)
    np.testing.assert_allclose([r["uncertainty"] for r in rows], unc, atol=2e-6)
    # the class is the argmax of the probabilities
    for row, p in zip(rows, probs, strict=True):
        assert row["class"] == classes[int(np.argmax(p))]
        assert row["class"] == max(row["probabilities"], key=row["probabilities"].get)
    # and the metrics the run reported for the test split follow from these predictions
    predicted = np.array([classes.index(r["class"]) for r in rows])
    labels = ctx.labels[finished["test"]]
    reported = finished["metrics"]["test"]
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    assert confusion.tolist() == reported["confusion"]
    assert classification_metrics(labels, probs, classes)["top1"] == pytest.approx(reported["top1"])


def test_predict_feeds_the_image_as_a_and_the_partner_as_b(finished):
    ctx = finished["ctx"]
    classes = list(ctx.images.classes)
    images, partners = finished["images"][:8], finished["partners"][:8]
    rows = predict_files(finished["run_dir"], images, partners, device="cpu")
    swapped = predict_files(finished["run_dir"], partners, images, device="cpu")
    assert not np.allclose(_probs(rows, classes), _probs(swapped, classes), atol=1e-4)
    model, _ = pipeline.load_finetuned(finished["run_dir"], torch.device("cpu"))
    idx = finished["test"]
    a = to_float(torch.from_numpy(np.ascontiguousarray(ctx.arrays_a[idx[:8]])))
    b = to_float(torch.from_numpy(np.ascontiguousarray(ctx.arrays_a[np.roll(idx, -1)[:8]])))
    np.testing.assert_allclose(_probs(rows, classes), model.predict(a, b).probs.numpy(), atol=2e-6)
    np.testing.assert_allclose(_probs(swapped, classes), model.predict(b, a).probs.numpy(), atol=2e-6)


def test_predict_keeps_the_input_order_with_a_bad_image_in_between(finished, tmp_path):
    classes = list(finished["ctx"].images.classes)
    images: list[Path] = list(finished["images"][:3])
    partners: list[Path] = list(finished["partners"][:3])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rows = predict_files(
        finished["run_dir"], [images[0], bad, images[2]], [partners[0], partners[1], partners[2]]
    )
    alone = predict_files(finished["run_dir"], [images[2]], [partners[2]], device="cpu")
    assert "error" in rows[1] and "class" not in rows[1]
    np.testing.assert_allclose(_probs([rows[2]], classes), _probs(alone, classes), atol=2e-6)


def test_predict_refuses_what_it_cannot_do_with_messages_that_say_what_to_do(finished, tmp_path):
    from mics.data.errors import DataError
    from mics.pipeline import RunError

    run_dir, images, partners = finished["run_dir"], finished["images"][:2], finished["partners"][:1]
    with pytest.raises(RunError, match="unknown engine 'tf'"):
        predict_files(run_dir, images, engine="tf")
    with pytest.raises(RunError, match=r"no fine-tuned model .*'mics run'"):
        predict_files(tmp_path, images)
    with pytest.raises(
        DataError,
        match=r"^got 2 images but 1 --partner images; give one partner per image or none \(then the partner "
        r"is generated as in training\)$",
    ):
        predict_files(run_dir, images, partners, device="cpu")
    with pytest.raises(RunError, match=re.escape(f"write it with 'mics export --run {run_dir}' first")):
        predict_files(run_dir, images, engine="onnx")
    rows = predict_files(run_dir, [tmp_path / "missing.png"], device="cpu")
    assert rows == [
        {
            "image": str(tmp_path / "missing.png"),
            "partner": None,
            "error": f"{tmp_path / 'missing.png'}: no such file",
        }
    ]


def test_predict_on_real_pairs_needs_the_partner(finished, tmp_path):
    import shutil

    from mics.data.errors import DataError

    run_dir = tmp_path / "paired"
    shutil.copytree(finished["run_dir"], run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**meta, "pair": "suffix:a,b"}))
    with pytest.raises(DataError, match=r"real pairs \(suffix:a,b\): give each image's partner"):
        predict_files(run_dir, finished["images"][:1], device="cpu")
    assert (
        "error"
        not in predict_files(run_dir, finished["images"][:1], finished["partners"][:1], device="cpu")[0]
    )


def test_rows_name_each_input_and_round_to_six_places(finished):
    run_dir, images, partners = finished["run_dir"], finished["images"][:4], finished["partners"][:4]
    for given in (partners, None):
        rows = predict_files(run_dir, images, given, device="cpu")
        assert [r["image"] for r in rows] == [str(p) for p in images]
        assert [r["partner"] for r in rows] == ([str(p) for p in partners] if given else [None] * 4)
        values = [v for r in rows for v in (*r["probabilities"].values(), r["uncertainty"])]
        assert all(v == round(v, 6) for v in values)
        assert any(v != round(v, 5) for v in values)  # rounded to 6 places, not fewer


def test_csv_and_json_outputs_hold_every_row_in_order():
    import csv
    import io

    from mics.predict import to_csv, to_json

    rows = [
        {
            "image": "a.png",
            "partner": "a_nbi.png",
            "class": "y",
            "probabilities": {"x": 0.25, "y": 0.75},
            "uncertainty": 0.5,
        },
        {"image": "b.png", "partner": None, "error": "b.png: no such file"},
        {
            "image": "c.png",
            "partner": None,
            "class": "x",
            "probabilities": {"x": 0.9, "y": 0.1},
            "uncertainty": 0.1,
        },
    ]
    table = list(csv.reader(io.StringIO(to_csv(rows))))
    assert table == [
        ["image", "partner", "class", "uncertainty", "p_x", "p_y", "error"],
        ["a.png", "a_nbi.png", "y", "0.5", "0.25", "0.75", ""],
        ["b.png", "", "", "", "", "", "b.png: no such file"],
        ["c.png", "", "x", "0.1", "0.9", "0.1", ""],
    ]
    assert json.loads(to_json(rows)) == rows
    assert to_json(rows) == json.dumps(rows, indent=2)  # one field per line, for people reading it
    assert list(csv.reader(io.StringIO(to_csv([rows[1]])))) == [
        ["image", "partner", "class", "uncertainty", "error"],
        ["b.png", "", "", "", "b.png: no such file"],
    ]


def test_a_run_of_the_first_version_loads_with_its_separate_fused_evidence_head(finished, tmp_path):
    # the first version's fused evidence came from its own head, before the config had a field for it:
    # such weights are loaded as "head" whatever the config says
    old = tmp_path / "old"
    shutil.copytree(finished["run_dir"], old)
    cfg = load_yaml(old / "config.yaml")
    assert cfg.finetune.fused_evidence == "head"
    dump_yaml(replace(cfg, finetune=replace(cfg.finetune, fused_evidence="classifier")), old / "config.yaml")
    model, info = pipeline.load_finetuned(old, torch.device("cpu"))
    assert info["cfg"].finetune.fused_evidence == "head"
    reference, _ = pipeline.load_finetuned(finished["run_dir"], torch.device("cpu"))
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_run_saved_before_class_weights_loads_with_weights_of_one(finished, tmp_path):
    # fine-tuned weights written before the class-weight buffer existed load as unweighted
    old = tmp_path / "old"
    shutil.copytree(finished["run_dir"], old)
    state, info = load_checkpoint(old / "finetune" / "best")
    del state["model"]["class_weights"]
    save_checkpoint(old / "finetune" / "best", state, info=info)
    model, loaded = pipeline.load_finetuned(old, torch.device("cpu"))
    assert torch.equal(model.class_weights, torch.ones(len(loaded["meta"]["classes"])))
    reference = pipeline.load_finetuned(finished["run_dir"], torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items() if k != "class_weights")


class _Recorder(torch.nn.Module):
    """A model whose prediction is made of its inputs' pixel means, recording each batch it sees."""

    num_classes = 3

    def __init__(self, uses_partner: bool) -> None:
        super().__init__()
        self.uses_partner = uses_partner
        self.batches: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []

    def predict(self, a: torch.Tensor, b: torch.Tensor | None) -> Prediction:
        self.batches.append((a, b, self.training))
        m = a.mean(dim=(1, 2, 3))
        probs = torch.stack([m, m + (b.mean(dim=(1, 2, 3)) if b is not None else 0), -m], dim=1).softmax(-1)
        return Prediction(probs, 1 - probs.max(-1).values, torch.stack([m, 2 * m], dim=1))


@pytest.mark.parametrize("uses_partner", [True, False])
def test_predict_arrays_batches_the_selected_images_in_order(uses_partner):
    gen = np.random.default_rng(0)
    arrays_a = gen.integers(0, 256, (9, 3, 4, 4), dtype=np.uint8)
    arrays_b = gen.integers(0, 256, (9, 3, 4, 4), dtype=np.uint8)
    indices = np.array([7, 2, 5, 0, 8])
    model = _Recorder(uses_partner).train()
    probs, unc, feats = pipeline.predict_arrays(
        model, arrays_a, arrays_b, indices, torch.device("cpu"), batch_size=2
    )
    assert [len(a) for a, _, _ in model.batches] == [2, 2, 1]
    assert not any(training for _, _, training in model.batches), "predictions are made in eval mode"
    assert model.training, "the model goes back to training mode"
    a = torch.cat([a for a, _, _ in model.batches])
    assert torch.equal(a, to_float(torch.from_numpy(arrays_a[indices])))
    if uses_partner:
        assert torch.equal(
            torch.cat([b for _, b, _ in model.batches]), to_float(torch.from_numpy(arrays_b[indices]))
        )
    else:
        assert all(b is None for _, b, _ in model.batches), "a one-modality model gets no partner"
    whole = model.predict(a, torch.cat([b for _, b, _ in model.batches]) if uses_partner else None)
    np.testing.assert_allclose(probs, whole.probs.numpy(), atol=1e-7)
    np.testing.assert_allclose(unc, whole.uncertainty.numpy(), atol=1e-7)
    np.testing.assert_allclose(feats, whole.features.numpy(), atol=1e-7)
    # no partner images at all: a partner-using model is given none
    model.batches.clear()
    pipeline.predict_arrays(model, arrays_a, None, indices, torch.device("cpu"), batch_size=8)
    assert [b for _, b, _ in model.batches] == [None]


def test_predict_arrays_of_no_images_has_the_shapes_of_none():
    probs, unc, feats = pipeline.predict_arrays(
        _Recorder(True), np.zeros((2, 3, 4, 4), np.uint8), None, np.array([], dtype=int), torch.device("cpu")
    )
    assert (probs.shape, unc.shape, feats.shape) == ((0, 3), (0,), (0, 0))


def test_load_finetuned_gives_the_model_in_eval_mode_with_its_record(finished):
    model, loaded = pipeline.load_finetuned(finished["run_dir"])  # the run's own device: the CPU here
    assert not model.training and not any(m.training for m in model.modules())
    assert loaded["meta"] == json.loads((finished["run_dir"] / "run.json").read_text(encoding="utf-8"))
    assert loaded["cfg"] == load_yaml(finished["run_dir"] / "config.yaml")
    assert next(model.parameters()).device == torch.device("cpu")
