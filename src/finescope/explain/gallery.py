"""``index.html``: a gallery that opens from disk (inline CSS and JavaScript, no network, images beside it).

Sections: the faithfulness table, the evidence per class, the most confident mistakes, every image (sortable by
confidence, correctness and class, filterable), and the files that could not be read.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from finescope.explain.methods import explains_class
from finescope.explain.overlay import mass_text
from finescope.files import write_text

CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}.muted{color:#777;font-size:.85em}
.grid{display:flex;flex-wrap:wrap;gap:.6em}.card{background:#fff;border:1px solid #ddd;border-radius:4px;
padding:.3em;font-size:.78em;width:600px}.card img{width:100%}.card.wrong{border:2px solid #d32f2f}
.card.right{border:2px solid #388e3c}.crop{width:150px;font-size:.72em;background:#fff;border:1px solid #ddd;
padding:.2em}.crop img{width:100%;image-rendering:pixelated}.note{color:#b26a00}
.controls{margin:.6em 0;display:flex;gap:1em;align-items:center;font-size:.9em}
"""

JS = """
function apply(){
  const grid=document.getElementById('all');const cards=[...grid.children];
  const key=document.getElementById('sort').value;const cls=document.getElementById('cls').value;
  const ok=document.getElementById('ok').value;
  const val=c=>key==='conf-desc'?-c.dataset.conf:key==='conf-asc'?+c.dataset.conf:
    key==='correct'?(c.dataset.correct==='0'?0:c.dataset.correct==='1'?2:1)-c.dataset.conf/10:
    key==='pred'?c.dataset.pred:key==='true'?c.dataset.true:c.dataset.name;
  cards.sort((a,b)=>{const x=val(a),y=val(b);return x<y?-1:x>y?1:0;});
  for(const c of cards){grid.appendChild(c);
    const show=(cls===''||c.dataset.pred===cls||c.dataset.true===cls)&&(ok===''||c.dataset.correct===ok);
    c.style.display=show?'':'none';}
}
document.addEventListener('DOMContentLoaded',()=>{for(const id of ['sort','cls','ok'])
  document.getElementById(id).addEventListener('change',apply);apply();});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _url(path) -> str:
    """A relative file path as an attribute's URL: '#', '?', '%' and spaces of image names percent-encoded (a
    '#' would start a fragment, and the figure would not load)."""
    return _e(quote(str(path)))


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def faithfulness_table(summary: dict) -> str:
    """The per-method table (deletion AUC lower is better, insertion higher, pointing game higher)."""
    head = "<tr><th>method</th><th>deletion AUC ↓</th><th>insertion AUC ↑</th><th>pointing game ↑</th><th>images</th></tr>"
    body = []
    for m, s in summary["methods"].items():
        pg = f"{s['pointing_game']:.3f} (n={s['pointing_n']})" if "pointing_game" in s else "–"
        if s.get("pointing_flat_maps"):  # images with nuclei whose map has no maximum to point at
            n = s["pointing_flat_maps"]
            pg += f" ({n} flat map{'s' if n > 1 else ''} left out)"
        body.append(f"<tr><td>{_e(m)}</td><td>{_fmt(s.get('deletion_auc'))}</td><td>{_fmt(s.get('insertion_auc'))}"
                    f"</td><td>{pg}</td><td>{s.get('n_images') or '–'}</td></tr>")  # – : no curves measured
    text = f"<table>{head}{''.join(body)}</table>"
    b = summary.get("boxes")
    if b:
        text += (f"<p><b>Hit rate of the selected boxes: {b['hit_rate']:.3f}</b> ({b['hits']}/{b['cells']} true "
                 f"atypical nuclei in {b['images']} images; {_e(b['definition'])}). The boxes cover on average "
                 f"{b['mean_box_union_fraction']:.1%} of the image; randomly placed nuclei would be hit at a rate "
                 f"of {b['chance_hit_rate']:.3f} (each image's coverage weighed by its nuclei); the largest box "
                 f"covers {b['mean_largest_box_fraction']:.1%} on average, and "
                 f"{b['images_with_a_box_over_half_the_image']} images have a box over half the image.</p>")
        if b["mean_box_union_fraction"] > 0.5:
            text += ("<p class=note>⚠ The boxes cover most of each image, so this hit rate says little: compare it "
                     "with the coverage above.</p>")
    s = summary["settings"]
    text += (f"<p class=muted>Curves: {s['grid']} blocks along the short side, {s['steps']} steps, removed blocks "
             f"replaced by the '{_e(s['baseline'])}' baseline, random = mean of {s['random_repeats']} random orders; "
             f"the probability followed is that of the {_e(s['target'])} class. detail = |image − baseline|, a map "
             "made from the image alone: a map of the model that does not beat it shows no more than the image's "
             "own detail.</p>")
    return text


def _card(r: dict) -> str:
    correct = "" if r["correct"] is None else ("1" if r["correct"] else "0")
    cls = {"1": "right", "0": "wrong"}.get(correct, "")
    true = f" · true <b>{_e(r['true'])}</b>" if r["true"] else ""
    note = f"<div class=note>⚠ {_e(r['notes'])}</div>" if r.get("notes") else ""
    return (f"<div class='card {cls}' data-conf='{r['confidence']:.6f}' data-correct='{correct}' "
            f"data-pred='{_e(r['predicted'])}' data-true='{_e(r['true'])}' data-name='{_e(r['name'])}'>"
            f"<a href='{_url(r['figure'])}'><img loading=lazy src='{_url(r['figure'])}' alt='{_e(r['name'])}'></a>"
            f"<div><b>{_e(r['name'])}</b> ({_e(r['size'])})<br>pred <b>{_e(r['predicted'])}</b> "
            f"{r['confidence']:.3f}{true}</div>{note}</div>")


def _crop(e: dict) -> str:
    mass = "" if e["mass"] is None else f" · mass {mass_text(e['mass'])}"
    mark = "" if e["correct"] is None else (" ✓" if e["correct"] else " ✗")
    whose = f"<br>peak of the {_e(e['map'])}" if e.get("map") else ""  # a CAM of another class than the section's
    return (f"<div class=crop><a href='{_url(e['figure'])}'><img src='{_url(e['file'])}' alt=''></a>{_e(e['image'])}"
            f"<br>crop {e['rank']}{mass} · p {e['probability']:.2f}{mark}{whose}</div>")


def _evidence(evidence: dict) -> str:
    parts = []
    for name, entries in evidence.items():
        crops = "".join(map(_crop, entries))
        parts.append(f"<h3>predicted {_e(name)} ({len(entries)})</h3><div class=grid>{crops or '<i>none</i>'}</div>")
    return "".join(parts)


def _controls(class_names: list[str]) -> str:
    opts = "".join(f"<option value='{_e(c)}'>{_e(c)}</option>" for c in class_names)
    return ("<div class=controls><label>sort <select id=sort><option value=conf-desc>confidence, high first</option>"
            "<option value=conf-asc>confidence, low first</option><option value=correct>mistakes first</option>"
            "<option value=pred>predicted class</option><option value=true>true class</option>"
            "<option value=name>name</option></select></label>"
            f"<label>class <select id=cls><option value=''>all</option>{opts}</select></label>"
            "<label>show <select id=ok><option value=''>all</option><option value=0>mistakes</option>"
            "<option value=1>correct</option></select></label></div>")


def _methods(methods: list[str], target: str) -> str:
    """The methods, and the class the CAMs among them explain (``--target``)."""
    cams = [m for m in methods if explains_class(m)]
    whose = "the true class (the predicted one when unknown)" if target == "true" else "the predicted class"
    return _e(", ".join(methods)) + (f" ({_e(', '.join(cams))}: maps of {whose})" if cams else "")


def _overrides_note(overrides: dict | None) -> str:
    """What ``--set`` changed of the model (another model than the one trained), or nothing."""
    if not overrides:
        return ""
    changed = " ".join(f"{k}={v}" for k, v in overrides.items())
    return f"<p class=note>⚠ Explained with --set {_e(changed)}, not the model's trained settings.</p>"


def skipped_text(skipped: list[dict]) -> str:
    """How many files explain skipped and why: ``2 files skipped: 1 unreadable, 1 too long and thin for the
    model's view`` (``kind`` of each entry of ``faithfulness.json``'s ``skipped``; unreadable where absent)."""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.get("kind", "unreadable")] = counts.get(s.get("kind", "unreadable"), 0) + 1
    why = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    return f"{len(skipped)} file{'s' if len(skipped) != 1 else ''} skipped: {why}"


def write_index(out: Path, rows: list[dict], summary: dict, evidence: dict, methods: list[str], top: int,
                has_plot: bool) -> Path:
    """Write ``out/index.html`` from the per-image rows, the faithfulness summary and the evidence crops."""
    mistakes = sorted((r for r in rows if r["correct"] is False), key=lambda r: -r["confidence"])[:top]
    acc = "" if summary["accuracy"] is None else f" · accuracy {summary['accuracy']:.3f}"
    if summary.get("trained_on"):
        acc += f" · <b>{summary['trained_on']} of them the model trained or validated on</b>"
    skipped = summary.get("skipped", [])
    skip_note = f" · <b>{_e(skipped_text(skipped))}</b>" if skipped else ""
    # the pointing game and the boxes' hit rate are measured with --no-faithfulness too, where cells.json is
    measured = summary.get("boxes") or any(m.get("n_images") or "pointing_game" in m for m in summary["methods"].values())
    parts = [
        f"<h1>finescope explain · {_e(summary['variant'])}</h1>",
        f"<p>{len(rows)} images from {_e(summary['source'])}{acc} · methods: "
        f"{_methods(methods, summary['settings']['target'])} · "
        f"checkpoint <code>{_e(summary['checkpoint'])}</code>{skip_note}</p>",
        _overrides_note(summary.get("model_overrides")),
        f"<p class=note>⚠ {_e(summary['split_leak'])}</p>" if summary.get("split_leak") else "",
        "<h2>Faithfulness</h2>",
        faithfulness_table(summary) if measured else "<p class=muted>not measured (--no-faithfulness)</p>",
        "<img src='faithfulness.png' alt='mean deletion and insertion curves'>" if has_plot else "",
        "<h2>Evidence per class: the most-attended crops</h2>", _evidence(evidence),
        f"<h2>Most confident mistakes ({len(mistakes)})</h2>",
        f"<div class=grid>{''.join(map(_card, mistakes)) or '<i>none, or true classes unknown</i>'}</div>",
        f"<h2>All images ({len(rows)})</h2>", _controls(summary["class_names"]),
        f"<div class=grid id=all>{''.join(map(_card, rows))}</div>",
    ]
    if skipped:
        items = "".join(f"<li><code>{_e(s['path'])}</code>: {_e(s['reason'])}</li>" for s in skipped)
        parts.append(f"<h2>Files skipped ({len(skipped)})</h2><ul>{items}</ul>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>finescope explain</title><style>{CSS}</style>"
            f"<script>{JS}</script></head><body>{''.join(parts)}</body></html>")
    path = Path(out) / "index.html"
    write_text(path, page)
    return path


__all__ = ["faithfulness_table", "write_index"]
