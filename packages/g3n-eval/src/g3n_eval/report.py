"""``g3n-eval report``: one HTML page a person can read, with its PNGs beside it.

The page is built only from the metrics JSON files the other subcommands wrote (and their
PNGs, copied next to ``index.html``), optional g3n-probe run folders (``results.csv``) and
optional extra volume montages. No script, no external resource: open ``index.html`` from
disk anywhere. Every number is shown with the settings and the inputs' manifest digests that
produced it (the provenance section).

Paths on the page are relative to the run folder (the *root*, see :func:`find_root`), so the
page names the sets the same way on every machine and shows nothing of the machine it was built
on: ``volumes-test``, ``eval/recon/metrics.json``. A path outside the root is shown as given;
a relative path recorded by another command (relative to where that command ran) as well.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .data import InputError
from .records import FORMAT, MetricsFileError, atomic_write_text, input_ref, read_metrics

# the section renderers; re-exported so `from g3n_eval.report import _control_section` still works
from .report_sections import SECTIONS as SECTIONS
from .report_sections import _anatomy_section as _anatomy_section
from .report_sections import _control_section as _control_section
from .report_sections import _fidelity_section as _fidelity_section
from .report_sections import _figure as _figure
from .report_sections import _fitted_on as _fitted_on
from .report_sections import _fmt as _fmt
from .report_sections import _forecast_anatomy as _forecast_anatomy
from .report_sections import _forecast_section as _forecast_section
from .report_sections import _memo_section as _memo_section
from .report_sections import _moved as _moved
from .report_sections import _probe_section as _probe_section
from .report_sections import _recon_section as _recon_section
from .report_sections import _table as _table
from .report_sections import _tokenizers_section as _tokenizers_section

CSS = """
body{font-family:sans-serif;margin:24px;max-width:1150px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}figure{display:inline-block;vertical-align:top;margin:6px 12px 6px 0}
figcaption{font-size:12px;color:#555}img{border:1px solid #ddd;max-width:100%}
.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}pre{font-size:11px;background:#f6f6f6;padding:6px;overflow:auto}
code{font-size:12px}ol.rows{font-size:12px;color:#555;margin:2px 0 0 0;padding-left:22px;max-width:560px;overflow-wrap:anywhere}
"""

#: files or folders that mark a run folder (g3n-pipeline writes both into the runs it makes)
ROOT_MARKERS = (".stages", "demo-config.json")


def find_root(out: str | os.PathLike[str]) -> Path:
    """The folder the report's paths are shown relative to, for a report written to ``out``:

    1. the nearest folder above ``out`` that holds a ``.stages`` folder or a ``demo-config.json``
       (a run made by g3n-pipeline);
    2. else the parent of ``out``'s parent: the ``<run>`` of the usual ``<run>/eval/report``
       (or ``out``'s parent where that would be the filesystem root).
    """
    out = Path(os.path.abspath(out))
    for d in out.parents:
        if any((d / m).exists() for m in ROOT_MARKERS):
            return d
    up = out.parent.parent
    return out.parent if up == Path(up.anchor) else up


class PathView:
    """Shows paths relative to a root folder; anything outside it as given."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(os.path.abspath(root))
        forms = [str(root)]
        try:
            forms.append(str(root.resolve()))
        except OSError:
            pass
        self.root = root
        self._roots = [Path(f) for f in dict.fromkeys(forms)]
        # a root's text inside free text: followed by '/' (a path below it) or by no path character
        self._res = [re.compile(r"(?<![\w.\-])" + re.escape(f) + r"(/|(?![\w.\-]))")
                     for f in sorted({*forms, *(html.escape(f) for f in forms)}, key=len, reverse=True)
                     if f != os.sep]

    def path(self, p: Any) -> Any:
        """An absolute path below the root as a relative one ('.' for the root itself); else ``p``."""
        if not isinstance(p, (str, os.PathLike)) or not str(p):
            return p
        s = str(p)
        if not os.path.isabs(s):
            return s
        cands = [Path(os.path.abspath(s))]
        try:
            cands.append(Path(s).resolve())
        except OSError:
            pass
        for c in cands:
            for r in self._roots:
                try:
                    return c.relative_to(r).as_posix() or "."
                except ValueError:
                    continue
        return s

    def local(self, p: str | os.PathLike[str]) -> str:
        """A path named to this process (relative ones are relative to the current folder)."""
        return self.path(os.path.abspath(p))

    def text(self, s: str) -> str:
        """Free text with every occurrence of the root's path made relative."""
        for rx in self._res:
            s = rx.sub(lambda m: "" if m.group(1) == "/" else ".", s)
        return s

    def doc(self, obj: Any) -> Any:
        """A copy of a JSON document with the root's path made relative in every string value."""
        if isinstance(obj, dict):
            return {k: self.doc(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.doc(v) for v in obj]
        if isinstance(obj, str):
            return self.path(obj) if os.path.isabs(obj) else self.text(obj)
        return obj


def collect(runs: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Metrics documents from files or folders (the folder and its direct subfolders)."""
    docs: list[tuple[Path, dict[str, Any]]] = []
    for r in map(Path, runs):
        if r.is_file():
            docs.append((r, read_metrics(r)))
            continue
        if not r.is_dir():
            raise MetricsFileError(f"{r}: no such metrics file or folder")
        found = sorted([*r.glob("*.json"), *r.glob("*/*.json")])
        n = 0
        for f in found:
            try:
                doc = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(doc, dict) and doc.get("format") == FORMAT:
                docs.append((f, doc))
                n += 1
        if n == 0:
            raise MetricsFileError(f"{r}: holds no g3n-eval metrics file")
    return docs


def _copy_figures(docs: list[tuple[Path, dict[str, Any]]], out: Path) -> dict[int, dict[str, str]]:
    """Copy every figure beside index.html under a unique name; {doc index: {figure: new name}}."""
    out.mkdir(parents=True, exist_ok=True)
    mapping: dict[int, dict[str, str]] = {}
    for i, (path, doc) in enumerate(docs):
        mapping[i] = {}
        for name, rel in (doc.get("results", {}).get("figures") or {}).items():
            src = path.parent / rel
            if not src.is_file():
                continue
            dst = f"{doc['measurement']}-{i}-{Path(rel).name}"
            shutil.copyfile(src, out / dst)
            mapping[i][name] = dst
    return mapping


FIGURE_CAPTIONS = {
    "recon_montage": "real vs reconstructed (central planes)",
    "fidelity_montage": "real / reconstructed / generated samples",
    "memorisation_hist": "nearest-neighbour distances",
    "forecast_difference": "mean forecast − baseline (red: brighter, blue: darker)",
    "forecast_montage": "baselines and forecasts",
    "forecast_subject_differences": "per-subject forecast − baseline",
}


def _row_label(label: str, key: str, meta: dict[str, Any] | None) -> str:
    """A montage row's label: the set's label, the sample key and, for a synthetic sample, what
    its request asked for (e.g. ``generated synthetic-syn-...-t1 (diagnosis=AD, modality=T1)``)."""
    req = (meta or {}).get("request") or {}
    cond = req.get("conditions") if isinstance(req, dict) else None
    asked = ", ".join(f"{k}={v}" for k, v in cond.items() if v is not None) if isinstance(cond, dict) else ""
    return f"{label} {key}" + (f" ({asked})" if asked else "")


def _montage_figure(src: str, caption: str, rows: Sequence[str]) -> str:
    """A montage with its row labels, whole, as text under the image (top to bottom)."""
    items = "".join(f"<li>{html.escape(r)}</li>" for r in rows)
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f'<figcaption>{html.escape(caption)}; rows, top to bottom:<ol class="rows">{items}</ol></figcaption></figure>')


def build_report(runs: Sequence[str | Path], out: str | Path, probe_runs: Sequence[str | Path] = (),
                 volumes: Sequence[str] = (), title: str = "BrainG3N evaluation report", tokenizers: Any = None,
                 montage_n: int = 4, root: str | Path | None = None) -> Path:
    """Write ``out/index.html`` and its PNGs; returns the page's path.

    Paths on the page are shown relative to ``root`` (default: :func:`find_root` of ``out``);
    no absolute path below it appears on the page."""
    from .figures import volume_montage

    out = Path(out)
    view = PathView(find_root(out) if root is None else root)
    runs = [os.path.abspath(r) for r in runs]
    probe_runs = [Path(os.path.abspath(p)) for p in probe_runs]
    docs = collect(runs)
    figs = _copy_figures(docs, out)
    shown = [(view.path(p), view.doc(d)) for p, d in docs]  # what the page shows of each document
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>g3n-eval {html.escape(__version__)}; protocol version(s) "
             f"{html.escape(', '.join(sorted({d['protocol_version'] for _, d in docs})))}; "
             f"{len(docs)} metrics file(s); paths relative to the run folder <code>{html.escape(view.root.name or '/')}</code>.</p>"]
    # images first: what a reader looks at
    images = []
    extra_inputs = []
    for spec in volumes:
        label, _, path = spec.partition("=")
        if not path:
            raise InputError(f"--volumes {spec!r}: expected LABEL=PATH")
        from .sources import volumes_of

        v = volumes_of(path, tokenizers, montage_n)
        name = f"volumes-{len(images)}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png"
        rows = [_row_label(label, k, m) for k, m in zip(v.keys, v.metas)]
        volume_montage(v.arrays, rows, out / name)
        images.append(_montage_figure(name, f"{label}: {view.local(path)}", rows))
        ref = input_ref(path, f"montage: {label}")
        extra_inputs.append({**ref, "path": view.local(path)})
    for i, (_, doc) in enumerate(docs):
        for fname, dst in figs[i].items():
            cap = FIGURE_CAPTIONS.get(fname, fname.replace("_", " ").replace("sweep ", "condition sweep: "))
            images.append(_figure(dst, f"{doc['measurement']}: {cap}"))
    if images:
        parts.append("<h2>Images</h2>" + "".join(images))
    if probe_runs:
        parts.append("<h2>Linear probes</h2>" + "".join(_probe_section(p, view.path) for p in probe_runs))
    for meas, (heading, render) in SECTIONS.items():
        these = [(p, d) for p, d in shown if d["measurement"] == meas]
        for p, d in these:
            parts.append(f"<h2>{heading}</h2><p><code>{html.escape(str(p))}</code></p>" + render(d))
    # provenance: every input of every metrics file, and the settings that change the figures
    prov_rows = []
    for p, d in shown:
        for ref in d.get("inputs", []):
            prov_rows.append([d["measurement"], ref.get("role"), ref.get("path"), ref.get("kind"), ref.get("digest"),
                              ref.get("samples")])
    for ref in extra_inputs:
        prov_rows.append(["report", ref.get("role"), ref.get("path"), ref.get("kind"), ref.get("digest"), ref.get("samples")])
    for p in probe_runs:
        prov_rows.append(["probe", "g3n-probe run", view.path(p), "probe-run", None, None])
    parts.append("<h2>Provenance</h2>" + _table(["measurement", "role", "path", "kind", "manifest digest", "samples"], prov_rows, left=5))
    for p, d in shown:
        parts.append(f"<details><summary>settings of {html.escape(d['measurement'])} "
                     f"(<code>{html.escape(str(p))}</code>)</summary><pre>"
                     f"{html.escape(json.dumps(d['settings'], indent=1, sort_keys=True))}</pre></details>")
    # the last word: any text still naming the root (an error message in the results, say) names it relatively
    body = view.text("".join(parts))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    return atomic_write_text(out / "index.html", page)
