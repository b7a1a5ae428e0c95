"""``mics serve``: the standard library's threading HTTP server around one run's model.

Routes: ``GET /`` the page; ``POST /predict`` (multipart form: ``image``, optional ``partner``) the page
with the prediction or a message saying what was wrong with the upload; ``GET /card`` the run's model card
(text); ``GET /figure/NAME`` a PNG figure of the run folder; ``GET /health`` "ok". A bad upload or a
failing request is answered with a page; the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mics.serve.page import render
from mics.serve.predictor import Predictor, Upload, UploadError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20_000_000
FORM_OVERHEAD = 64_000  # bytes of multipart headers and boundaries on top of the files
DRAIN_LIMIT = 512_000_000  # larger bodies are not read: the connection is closed after the answer
FIGURE_NAMES = ("umap.png", "confusion.png")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """The file fields of a multipart/form-data body (``Upload``s, in order); UploadError if malformed."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise UploadError(
            "The upload was not sent as a form (multipart/form-data); use the form on this page."
        )
    uploads = []
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise UploadError("The upload was cut off or malformed; please try again.")
        headers = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
        field = headers.get_param("name", header="content-disposition")
        filename = headers.get_filename()
        if isinstance(field, str) and filename is not None:
            uploads.append(Upload(field, filename, data.removesuffix(b"\r\n")))
    return uploads


def _figures(run_dir: Path) -> list[str]:
    return [name for name in FIGURE_NAMES if (run_dir / name).is_file()] + [
        f"figures/{p.name}" for p in sorted((run_dir / "figures").glob("*umap*.png"))
    ]


def page_context(predictor: Predictor, max_bytes: int) -> dict[str, Any]:
    """What the page shows about the run, read once at start."""
    run_dir = predictor.run_dir
    metrics_path = run_dir / "metrics.json"
    meta = predictor.meta
    return {
        "run_name": run_dir.name,
        "classes": predictor.classes,
        "modalities": predictor.modalities,
        "size": predictor.size,
        "generated": predictor.generated and predictor.uses_partner,
        "needs_partner": predictor.needs_partner,
        "accepts_partner": predictor.accepts_partner,
        "threshold": predictor.threshold,
        "max_mb": max_bytes / 1_000_000,
        "metrics": json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else None,
        "data_name": Path(str(meta.get("data", "?"))).name,
        "summary": (
            f"{meta.get('n_labelled')} labelled of {meta.get('n_train')} training images "
            f"({100 * float(meta.get('labels') or 0):g} %), preset {meta.get('preset')}, "
            f"seed {meta.get('seed')}, "
            f"{meta.get('n_test')} test images."
        ),
        "figures": _figures(run_dir),
        "has_card": (run_dir / "model_card.md").is_file(),
    }


class MicsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], predictor: Predictor, max_bytes: int) -> None:
        super().__init__(address, Handler)
        self.predictor = predictor
        self.max_bytes = max_bytes
        self.context = page_context(predictor, max_bytes)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: MicsServer
    server_version = "mics-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # the page loads nothing from elsewhere; say so to the browser too
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; form-action 'self'",
        )
        self.send_header("X-Content-Type-Options", "nosniff")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _page(self, status: int = 200, close: bool = False, **kwargs: Any) -> None:
        self._send(
            status, render(self.server.context, **kwargs).encode("utf-8"), "text/html; charset=utf-8", close
        )

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        run_dir = self.server.predictor.run_dir
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._page()
        elif path == "/health":
            self._send(200, b"ok", "text/plain; charset=utf-8")
        elif path == "/card" and (run_dir / "model_card.md").is_file():
            self._send(200, (run_dir / "model_card.md").read_bytes(), "text/plain; charset=utf-8")
        elif path.startswith("/figure/") and path.removeprefix("/figure/") in self.server.context["figures"]:
            self._send(200, (run_dir / path.removeprefix("/figure/")).read_bytes(), "image/png")
        else:
            self._page(HTTPStatus.NOT_FOUND, error=f"There is no page {path}; go back to the start page.")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/predict":
            self._page(HTTPStatus.NOT_FOUND, error="Uploads go to /predict; use the form on this page.")
            return
        try:
            self._predict()
        except Exception as err:  # a failing request must not stop the server
            traceback.print_exc(file=sys.stderr)
            self._page(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                error=f"Something went wrong while predicting ({type(err).__name__}: {err}). "
                "The server is still running; try another image.",
            )

    def _predict(self) -> None:
        limit = self.server.max_bytes
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._page(HTTPStatus.LENGTH_REQUIRED, error="The upload had no size; use the form on this page.")
            return
        if length > 2 * limit + FORM_OVERHEAD:
            self._drain(length)
            self._page(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                close=length > DRAIN_LIMIT,
                error=f"The upload is too large ({length / 1e6:.1f} MB); images up to {limit / 1e6:g} MB "
                "are accepted.",
            )
            return
        body = self.rfile.read(length)
        try:
            uploads = {u.field: u for u in parse_multipart(body, self.headers.get("Content-Type", ""))}
            image = uploads.get("image")
            if image is None or not image.filename:
                raise UploadError("Choose an image first (or drop one on the box).")
            for upload in uploads.values():
                if len(upload.data) > limit:
                    raise UploadError(
                        f"“{upload.filename}” is too large ({len(upload.data) / 1e6:.1f} MB); images up to "
                        f"{limit / 1e6:g} MB are accepted."
                    )
            prediction = self.server.predictor.predict(image, uploads.get("partner"))
        except UploadError as err:
            self._page(HTTPStatus.BAD_REQUEST, error=str(err))
            return
        self._page(prediction=prediction)

    def _drain(self, length: int) -> None:
        """Read and drop a refused body, so that the browser gets to read the answer."""
        left = min(length, DRAIN_LIMIT)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)


def make_server(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine: str = "torch",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> MicsServer:
    """A server for ``run_dir``, bound but not yet serving (``serve_forever``)."""
    from mics.eval.threshold import read_threshold, write_threshold

    run_dir = Path(run_dir)
    record = read_threshold(run_dir) or write_threshold(run_dir)
    predictor = Predictor(run_dir, engine, threshold=record["threshold"] if record else None)
    return MicsServer((host, port), predictor, max_bytes)


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine: str = "torch",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> None:
    """Serve the page until interrupted; prints the address first (one line on stdout)."""
    from mics.pipeline import RunError

    try:
        server = make_server(run_dir, host=host, port=port, engine=engine, max_bytes=max_bytes)
    except OSError as err:
        raise RunError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port"
        ) from None
    if host not in LOOPBACK:
        print(
            f"warning: bound to {host}: other machines on the network can reach this page and upload images",
            file=sys.stderr,
        )
    if server.predictor.threshold is None:
        print(
            "note: no low-confidence threshold (run 'mics evaluate' to save val predictions)", file=sys.stderr
        )
    print(f"serving {run_dir} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
