"""The HTML of the page: upload form, the prediction (bar chart, uncertainty, partner) and the run's report.

One self-contained document: inline CSS, a few lines of inline JavaScript for drag and drop (the form
works without it), pictures as data: URLs. Nothing is fetched from anywhere else. Every string that comes
from a file name or a run folder is escaped.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from mics.serve.predictor import Prediction

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 1.5em auto; padding: 0 1em;
  color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.note { color: #555; font-size: 0.9em; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 1.2em; text-align: center;
  background: #fafafa; }
#drop.over { background: #e8f0ff; border-color: #3366cc; }
.error { background: #fdecea; border: 1px solid #d93025; color: #a50e0e; padding: 0.8em;
  border-radius: 6px; }
.flag-low { background: #fff4e5; border: 1px solid #e37400; padding: 0.6em; border-radius: 6px; }
.flag-ok { background: #e6f4ea; border: 1px solid #188038; padding: 0.6em; border-radius: 6px; }
.pictures { display: flex; gap: 1.2em; flex-wrap: wrap; }
.pictures figure { margin: 0; } .pictures img { width: 192px; height: 192px; object-fit: contain;
  image-rendering: pixelated; border: 1px solid #ccc; background: #000; }
.bars { margin: 0.6em 0; } .bar-row { display: flex; align-items: center; gap: 0.6em; margin: 0.2em 0; }
.bar-label { width: 11em; text-align: right; } .bar-track { flex: 1; background: #eee; height: 1.1em; }
.bar { background: #3366cc; height: 100%; } .bar.top { background: #188038; } .bar-value { width: 4.5em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.num { text-align: right; }
"""

SCRIPT = """
const drop = document.getElementById('drop');
const input = document.getElementById('image-input');
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => {
  e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files.length) {
    input.files = e.dataTransfer.files;
    document.getElementById('form').submit();
  }
});
"""


VIRTUAL_NOTE = " The partner image is virtual NBI, a colour transform, not real NBI."


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f} %"


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def _form(ctx: dict[str, Any]) -> str:
    mods = ctx["modalities"]
    partner = ""
    if ctx["accepts_partner"]:
        need = (
            "required" if ctx["needs_partner"] else "optional; generated from the first image if left empty"
        )
        partner = (
            f"<p><label>{escape(mods[1])} image ({need}): "
            '<input type="file" name="partner" id="partner-input" accept="image/*"></label></p>'
        )
    return f"""
<form id="form" method="post" action="/predict" enctype="multipart/form-data">
  <div id="drop">Drop a {escape(mods[0])} image here, or choose it:
    <input type="file" name="image" id="image-input" accept="image/*"></div>
  {partner}
  <p><button type="submit" id="submit">Predict</button>
  <span class="note">Images up to {ctx["max_mb"]:g} MB (JPEG, PNG, BMP, TIFF, WebP). They stay on this
  machine: the page and the model run here, nothing is sent anywhere else.</span></p>
</form>"""


def _result(p: Prediction, ctx: dict[str, Any]) -> str:
    mods = ctx["modalities"]
    order = sorted(range(len(p.classes)), key=lambda i: -p.probabilities[i])
    top = order[0]
    bars = "".join(
        f'<div class="bar-row" data-class="{escape(p.classes[i])}">'
        f'<span class="bar-label">{escape(p.classes[i])}</span>'
        f'<span class="bar-track"><span class="bar{" top" if i == top else ""}" '
        f'style="display:block;width:{100 * p.probabilities[i]:.1f}%"></span></span>'
        f'<span class="bar-value">{100 * p.probabilities[i]:.1f} %</span></div>'
        for i in order
    )
    threshold = ctx["threshold"]
    if p.flagged is None:
        flag = '<p id="confidence-flag" class="note">No low-confidence threshold for this run.</p>'
    elif p.flagged:
        flag = (
            '<p id="confidence-flag" class="flag-low"><strong>Low confidence.</strong> The uncertainty '
            f"({p.uncertainty:.3f}) is above {threshold:.3f}, the level above which this model's predictions "
            "on the validation images were wrong more often. Do not rely on this answer.</p>"
        )
    else:
        flag = (
            '<p id="confidence-flag" class="flag-ok">Uncertainty below the low-confidence level '
            f"({threshold:.3f}, chosen on the validation images). Confident predictions can still be "
            "wrong.</p>"
        )
    pictures = [
        f'<figure><img id="uploaded-image" alt="uploaded image" src="{_data_url(p.image_png)}">'
        f"<figcaption>Uploaded {escape(mods[0])} image</figcaption></figure>",
        f'<figure><img id="model-input" alt="model input" src="{_data_url(p.model_input_png)}">'
        f"<figcaption>What the model sees ({ctx['size']} x {ctx['size']} px)</figcaption></figure>",
    ]
    if p.partner_png is not None:
        caption = (
            f"Generated {escape(mods[1])} partner (virtual, not real {escape(mods[1])})"
            if p.partner_source == "generated"
            else f"Uploaded {escape(mods[1])} partner"
        )
        pictures.append(
            f'<figure><img id="partner-image" alt="partner image" src="{_data_url(p.partner_png)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return f"""
<section id="result">
  <h2>Prediction</h2>
  <p>Predicted class: <strong id="predicted-class">{escape(p.predicted)}</strong>
     ({100 * p.probabilities[top]:.1f} %);
     uncertainty u = <strong id="uncertainty">{p.uncertainty:.3f}</strong>
     <span class="note">(0 = certain, 1 = no evidence at all)</span></p>
  {flag}
  <div class="bars" id="probabilities">{bars}</div>
  <div class="pictures">{"".join(pictures)}</div>
</section>"""


def _report(ctx: dict[str, Any]) -> str:
    metrics: dict[str, Any] = ctx["metrics"] or {}
    classes: list[str] = ctx["classes"]
    rows = "".join(
        f"<tr><td>{split}</td><td class='num'>{m['n']}</td><td class='num'>{_pct(m['top1'])}</td>"
        f"<td class='num'>{_pct(m['balanced_accuracy'])}</td><td class='num'>{_pct(m['macro_f1'])}</td>"
        f"<td class='num'>{_num(m.get('ece'))}</td>"
        f"<td class='num'>{_num(m.get('uncertainty_auroc'))}</td></tr>"
        for split in ("val", "test")
        if (m := metrics.get(split))
    )
    parts = [
        "<h2>This model</h2>",
        f"<p>Run <code>{escape(ctx['run_name'])}</code>: {escape(ctx['summary'])}</p>",
    ]
    if rows:
        parts.append(
            '<table id="metrics"><tr><th>split</th><th>images</th><th>top-1</th><th>balanced accuracy</th>'
            "<th>macro-F1</th><th>ECE</th><th>uncertainty AUROC</th></tr>" + rows + "</table>"
        )
    confusion = (metrics.get("test") or {}).get("confusion")
    if confusion:
        head = "".join(f"<th>{escape(c)}</th>" for c in classes)
        body = "".join(
            f"<tr><th>{escape(c)}</th>" + "".join(f"<td class='num'>{v}</td>" for v in row) + "</tr>"
            for c, row in zip(classes, confusion, strict=False)
        )
        parts.append(
            "<p>Confusion matrix on the test images (rows: true class, columns: predicted):</p>"
            f'<table id="confusion"><tr><th></th>{head}</tr>{body}</table>'
        )
    for name in ctx["figures"]:
        parts.append(
            f'<figure><img alt="{escape(name)}" src="/figure/{escape(name)}" style="max-width:100%">'
            f"<figcaption>{escape(name)}</figcaption></figure>"
        )
    if ctx["has_card"]:
        parts.append('<p><a href="/card" id="card-link">Model card</a> (data, split, metrics, limits).</p>')
    return "\n".join(parts)


def render(ctx: dict[str, Any], prediction: Prediction | None = None, error: str | None = None) -> str:
    """The whole page; ``ctx`` describes the run (see :mod:`mics.serve.app`)."""
    message = f'<p id="error" class="error" role="alert">{escape(error)}</p>' if error else ""
    result = _result(prediction, ctx) if prediction is not None else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>MICS: {escape(ctx["run_name"])}</title><style>{STYLE}</style></head>
<body>
<h1>MICS classifier: {escape(", ".join(ctx["classes"]))}</h1>
<p class="note"><strong>Research use only</strong>; not a medical device. Trained on
{escape(ctx["data_name"])} only.{VIRTUAL_NOTE if ctx["generated"] else ""}</p>
{_form(ctx)}
{message}
{result}
{_report(ctx)}
<script>{SCRIPT}</script>
</body></html>
"""
