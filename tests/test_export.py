"""ONNX export: parity with the PyTorch model on the bundled real images, and a run without this package."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")

from mics.data.errors import DataError  # noqa: E402
from mics.export import export_onnx  # noqa: E402
from mics.onnx_predict import OnnxModel, load_image  # noqa: E402
from mics.pipeline import RunError  # noqa: E402
from mics.predict import _decode, predict_files  # noqa: E402
from tests.conftest import GI, MILK  # noqa: E402

TOLERANCE = 1e-4  # max |probability difference|, ONNX vs PyTorch


def mics(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run the command line in this process (no second torch start-up): (exit code, stdout, stderr)."""
    from mics.cli import main

    capsys.readouterr()
    argv, sys.argv = sys.argv, ["mics", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def max_prob_diff(rows_a: list[dict], rows_b: list[dict]) -> float:
    assert len(rows_a) == len(rows_b)
    return max(
        abs(a["probabilities"][c] - b["probabilities"][c])
        for a, b in zip(rows_a, rows_b, strict=True)
        for c in a["probabilities"]
    )


@pytest.fixture(scope="module")
def gi_onnx(gi_smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "gi.onnx"
    result = export_onnx(gi_smoke_run, out)
    assert result.runner == out.parent / "predict_onnx.py" and result.runner.is_file()
    return out


@pytest.fixture(scope="module")
def milk_onnx(milk_smoke_run: Path) -> Path:
    result = export_onnx(milk_smoke_run)
    assert result.path == milk_smoke_run / "model.onnx" and result.max_abs_diff <= TOLERANCE
    return result.path


def gi_images() -> list[Path]:
    return sorted(GI.glob("*/*.jpg"))


def milk_pairs() -> tuple[list[Path], list[Path]]:
    a = sorted(MILK.glob("*/*__clinical.jpg"))
    return a, [p.with_name(p.name.replace("clinical", "dermoscopic")) for p in a]


def test_generated_partner_graph_matches_pytorch_on_every_sample_image(gi_smoke_run, gi_onnx):
    images = gi_images()
    torch_rows = predict_files(gi_smoke_run, images, device="cpu")
    onnx_rows = predict_files(gi_smoke_run, images, engine="onnx", onnx_path=gi_onnx)
    assert max_prob_diff(torch_rows, onnx_rows) <= TOLERANCE
    assert [r["class"] for r in torch_rows] == [r["class"] for r in onnx_rows]
    assert (
        max(abs(a["uncertainty"] - b["uncertainty"]) for a, b in zip(torch_rows, onnx_rows, strict=True))
        <= TOLERANCE
    )
    # the graph takes one image and returns the partner it generated
    model = OnnxModel(gi_onnx)
    assert model.input_names == ["image"] and model.info["partner"] == "generated"
    assert model.output_names == ["probabilities", "uncertainty", "generated_partner"]


def test_the_parity_check_would_catch_wrong_preprocessing(gi_smoke_run, gi_onnx):
    """Swapping the colour channels (a classic deployment bug) moves the probabilities past the tolerance."""
    images = gi_images()[::10]
    model = OnnxModel(gi_onnx)
    torch_probs = np.array(
        [list(r["probabilities"].values()) for r in predict_files(gi_smoke_run, images, device="cpu")]
    )
    arrays = np.stack([_decode(p, model.image_size) for p in images])
    swapped = model.predict(arrays[..., ::-1].copy())["probabilities"]
    right = model.predict(arrays)["probabilities"]
    assert np.abs(right - torch_probs).max() <= TOLERANCE
    assert np.abs(swapped - torch_probs).max() > TOLERANCE


def test_real_pair_graph_matches_pytorch_on_every_sample_pair(milk_smoke_run, milk_onnx):
    a, b = milk_pairs()
    torch_rows = predict_files(milk_smoke_run, a, b, device="cpu")
    onnx_rows = predict_files(milk_smoke_run, a, b, engine="onnx")
    assert max_prob_diff(torch_rows, onnx_rows) <= TOLERANCE
    assert [(r["image"], r["partner"]) for r in onnx_rows] == [
        (str(x), str(y)) for x, y in zip(a, b, strict=True)
    ]
    values = [v for r in onnx_rows for v in (*r["probabilities"].values(), r["uncertainty"])]
    assert all(v == round(v, 6) for v in values) and any(v != round(v, 5) for v in values)
    with pytest.raises(DataError, match=r"^got 2 images but 1 --partner images; give one partner per image$"):
        predict_files(milk_smoke_run, a[:2], b[:1], engine="onnx")
    assert OnnxModel(milk_onnx).input_names == ["image", "partner"]


def test_export_and_predict_engine_onnx_on_the_command_line(milk_smoke_run, capsys, tmp_path):
    out = tmp_path / "milk.onnx"
    code, stdout, _ = mics(capsys, "export", "--run", milk_smoke_run, "--out", out)
    assert code == 0 and str(out) in stdout and "image, partner" in stdout
    a, b = milk_pairs()
    bad = tmp_path / "broken__clinical.jpg"
    bad.write_bytes(b"not an image")
    partners = [x for p in (b[0], b[1], b[2]) for x in ("--partner", p)]
    rows = {}
    for engine in ("torch", "onnx"):
        code, stdout, _ = mics(
            capsys,
            "predict",
            "--run",
            milk_smoke_run,
            a[0],
            a[1],
            bad,
            *partners,
            "--engine",
            engine,
            "--onnx",
            out,
        )
        assert code == 0
        rows[engine] = json.loads(stdout)
    assert "error" in rows["onnx"][2] and "broken" in rows["onnx"][2]["error"]
    assert max_prob_diff(rows["torch"][:2], rows["onnx"][:2]) <= TOLERANCE
    code, _, stderr = mics(
        capsys, "predict", "--run", milk_smoke_run, a[0], "--engine", "onnx", "--onnx", out
    )
    assert code == 2 and "--partner" in stderr


def test_predict_engine_onnx_without_an_export_says_what_to_do(gi_smoke_run, capsys, tmp_path):
    code, _, stderr = mics(
        capsys,
        "predict",
        "--run",
        gi_smoke_run,
        gi_images()[0],
        "--engine",
        "onnx",
        "--onnx",
        tmp_path / "x.onnx",
    )
    assert code == 2 and "mics export" in stderr


def test_predict_engine_onnx_with_a_file_that_is_not_a_model_says_so(gi_smoke_run, capsys, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, stderr = mics(
        capsys, "predict", "--run", gi_smoke_run, gi_images()[0], "--engine", "onnx", "--onnx", junk
    )
    assert code == 2 and "junk.onnx" in stderr and "mics export" in stderr


def test_the_onnx_engine_refuses_what_its_graph_cannot_do(
    gi_smoke_run, gi_onnx, milk_smoke_run, milk_onnx, monkeypatch
):
    a, b = milk_pairs()
    with pytest.raises(
        DataError, match=r"^this model was trained on real pairs: give each image's partner with --partner$"
    ):
        predict_files(milk_smoke_run, a[:1], engine="onnx")
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{gi_onnx} generates the partner inside the graph and takes no --partner; "
            "drop --partner or use --engine torch"
        ),
    ):
        predict_files(gi_smoke_run, gi_images()[:1], gi_images()[1:2], engine="onnx", onnx_path=gi_onnx)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed
    with pytest.raises(
        RunError, match="^" + re.escape("the onnx engine needs onnxruntime: pip install 'mics[export]'") + "$"
    ):
        predict_files(milk_smoke_run, a[:1], b[:1], engine="onnx")


def test_the_onnx_engine_predicts_the_images_after_a_bad_one(milk_smoke_run, milk_onnx, tmp_path):
    a, b = milk_pairs()
    bad = tmp_path / "broken__clinical.jpg"
    bad.write_bytes(b"not an image")
    rows = predict_files(milk_smoke_run, [a[0], bad, a[1]], [b[0], b[1], b[1]], engine="onnx")
    assert "error" in rows[1] and "class" not in rows[1]
    alone = predict_files(milk_smoke_run, [a[1]], [b[1]], engine="onnx")
    assert max_prob_diff(rows[2:], alone) <= 2e-6  # the same image, predicted in another batch


def test_export_of_an_unfinished_run_is_refused(capsys, tmp_path):
    code, _, stderr = mics(capsys, "export", "--run", tmp_path)
    assert code == 2 and "mics run" in stderr


def test_standalone_loader_decodes_like_training():
    """The runner's preprocessing (Pillow only) gives the very pixels the training cache holds."""
    for path in gi_images()[:40] + milk_pairs()[0][:40]:
        for size in (32, 64):
            assert np.array_equal(load_image(path, size), _decode(path, size)), path


def _site_without_mics(tmp: Path) -> Path:
    """A folder holding only onnxruntime, numpy and Pillow (links into this environment)."""
    import numpy
    import onnxruntime
    import PIL

    site = tmp / "site"
    site.mkdir()
    for module in (numpy, onnxruntime, PIL):
        package = Path(module.__file__).parent
        for name in (package.name, f"{package.name}.libs", "pillow.libs" if module is PIL else ""):
            if name and (package.parent / name).exists():
                (site / name).symlink_to(package.parent / name)
    return site


def test_exported_model_runs_where_mics_cannot_be_imported(gi_smoke_run, gi_onnx, tmp_path):
    runner = gi_onnx.parent / "predict_onnx.py"
    images = gi_images()[:6]
    site = _site_without_mics(tmp_path)
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "try:\n"
        "    import mics\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('mics is importable: the check would prove nothing')\n"
        "import runpy\n"
        f"sys.argv = ['predict_onnx.py', {str(gi_onnx)!r}, *{[str(p) for p in images]!r}]\n"
        f"runpy.run_path({str(runner)!r}, run_name='__main__')\n"
    )
    # -I: no PYTHONPATH, no user site, script dir not on sys.path; -S: no site-packages (nor .pth hooks)
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert max_prob_diff(predict_files(gi_smoke_run, images, device="cpu"), rows) <= TOLERANCE
