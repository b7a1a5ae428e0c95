"""The web page's server over plain HTTP: uploads, refusals with a message, and serving on after them."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import GI, MILK

from mics.predict import predict_files
from mics.serve import make_server
from mics.serve.app import MicsServer, parse_multipart
from mics.serve.predictor import UploadError

BOUNDARY = "----micsTestBoundary7MA4YWxk"
LIMIT = 200_000


def form(*files: tuple[str, str, bytes]) -> tuple[bytes, str]:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for field, name, data in files
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def post(server: MicsServer, body: bytes, content_type: str) -> tuple[int, str]:
    request = urllib.request.Request(
        server.url + "predict", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def get(server: MicsServer, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def running(run_dir: Path) -> Iterator[MicsServer]:
    server = make_server(run_dir, port=0, max_bytes=LIMIT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gi_server(gi_smoke_run: Path) -> Iterator[MicsServer]:
    yield from running(gi_smoke_run)


@pytest.fixture(scope="module")
def milk_server(milk_smoke_run: Path) -> Iterator[MicsServer]:
    yield from running(milk_smoke_run)


def test_multipart_bodies_are_split_into_files_byte_for_byte():
    image = (GI / "polyps").glob("*.jpg").__next__().read_bytes()
    body, ctype = form(("image", "a.jpg", image), ("partner", "b.png", b"\r\n--x\r\n"))
    uploads = parse_multipart(body, ctype)
    assert [(u.field, u.filename) for u in uploads] == [("image", "a.jpg"), ("partner", "b.png")]
    assert uploads[0].data == image and uploads[1].data == b"\r\n--x\r\n"
    with pytest.raises(UploadError, match="form"):
        parse_multipart(body, "application/x-www-form-urlencoded")


def test_binds_to_this_machine_only_by_default(gi_server):
    assert gi_server.server_address[0] == "127.0.0.1"


def test_the_page_shows_the_runs_report(gi_server):
    status, page = get(gi_server, "")
    assert status == 200 and 'id="metrics"' in page and 'id="confusion"' in page
    assert "Research use only" in page and 'href="/card"' in page
    assert get(gi_server, "card")[1].startswith("# Model card")
    assert get(gi_server, "health") == (200, "ok")
    assert get(gi_server, "nothing-here")[0] == 404


def test_an_upload_gets_the_same_prediction_as_mics_predict(gi_server, gi_smoke_run):
    path = sorted((GI / "polyps").glob("*.jpg"))[3]
    status, page = post(gi_server, *form(("image", path.name, path.read_bytes())))
    expected = predict_files(gi_smoke_run, [path], device="cpu")[0]
    assert status == 200, page
    assert f'<strong id="predicted-class">{expected["class"]}</strong>' in page
    assert f'<strong id="uncertainty">{expected["uncertainty"]:.3f}</strong>' in page
    assert 'id="partner-image"' in page and "Generated NBI partner" in page
    assert 'id="confidence-flag"' in page


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        ((("image", "notes.txt", b"just some text"),), 400, "not an image"),
        ((("image", "empty.jpg", b""),), 400, "is empty"),
        ((("partner", "x.jpg", b"x"),), 400, "Choose an image first"),
        ((("image", "big.jpg", b"\xff" * (LIMIT + 10)),), 400, "too large"),
        ((("image", "huge.jpg", b"\xff" * (3 * LIMIT)),), 413, "too large"),
    ],
)
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(gi_server, files, status, message):
    got, page = post(gi_server, *form(*files))
    assert got == status and 'id="error"' in page and message in page
    good = sorted((GI / "normal-cecum").glob("*.jpg"))[0]
    assert post(gi_server, *form(("image", good.name, good.read_bytes())))[0] == 200


def test_real_pair_runs_ask_for_the_partner(milk_server, milk_smoke_run):
    a = sorted((MILK / "NV").glob("*__clinical.jpg"))[0]
    b = a.with_name(a.name.replace("clinical", "dermoscopic"))
    status, page = post(milk_server, *form(("image", a.name, a.read_bytes())))
    assert status == 400 and "dermoscopic image of the same lesion" in page
    status, page = post(
        milk_server, *form(("image", a.name, a.read_bytes()), ("partner", b.name, b.read_bytes()))
    )
    expected = predict_files(milk_smoke_run, [a], [b], device="cpu")[0]
    assert status == 200 and f'id="predicted-class">{expected["class"]}<' in page
    assert "Uploaded dermoscopic partner" in page
