"""The evaluation's outputs: ``results.json`` (strict JSON, NaN as null), ``results.md``, ``bytes.md`` (the AUC-vs-
bytes and bytes-per-source-type tables alone, as pasted into the model card), ``auc_vs_bytes.html`` (plotly, one
chart: AUC against mean bytes, one line per method and study set), ``auc_vs_bytes.png`` (the same data: plotly's
static export when kaleido is installed, else matplotlib) and the console summary."""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import CONDITION_LABELS, NOT_CLINICAL, ABLATION_KEEP, fmt_keep as _fmt_keep
from .codecs import CODEC_LABELS, CODECS
from ..utils import atomic_write_text, json_clean

__all__ = ["render_markdown", "render_bytes_markdown", "chart_series", "render_html", "render_png",
           "write_outputs", "summary_table"]

#: Line colour per method (the same in every set; the set is the dash style).
METHOD_COLOURS = {"image_only": "#1f77b4", "generated_report": "#2ca02c", "oracle_given_report": "#7f7f7f",
                  "jpeg": "#d62728", "webp": "#ff7f0e", "jpeg2000": "#9467bd", "jpegxl": "#8c564b"}
SET_LABELS = {"internal": "internal (224² Kermany + covid-cxr)", "fullsize": "full-size (covid-cxr + JSRT)"}
SET_DASH = {"internal": "solid", "fullsize": "dash"}


def _f(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _bytes(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:,.0f}"


def _auc_ci(r: dict) -> str:
    return f"{_f(r['auc'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]"


def render_markdown(res: dict) -> str:
    m = res["meta"]
    L: list[str] = ["# NEURAL evaluation", ""]
    for w in res.get("warnings", []):
        L += [f"> **WARNING: {w}**", ""]
    L += [f"_{res['disclaimer']}_", "",
          f"- model: `{m['model_version']}` ({m['model_dir'] or 'built-in untrained bundle'}), "
          f"config hash `{m['model_identity']['config_hash']}`",
          f"- split: `{m['split_file']}` (sha256 `{m['split_sha256'][:16]}…`), test patients only",
          f"- studies: {m['n_studies']['classification']} classification ({m['subset']['classification']}), "
          f"{m['n_studies']['report_generation']} report generation ({m['subset']['report_generation']}), "
          f"{m['n_studies']['failed']} failed to load; subset: {m['subset']['how']}",
          f"- records: {m['record_source']}", f"- seed {m['seed']}, bootstrap {m['bootstrap']} "
          f"({m['bootstrap_method']}), keeps {', '.join(_fmt_keep(k) for k in m['keeps'])}, context layer "
          f"{m['context_side']} px (its bytes are counted)",
          f"- thresholds: image {m['thresholds']['image']:.3f}, report {m['thresholds']['report']:.3f}: "
          f"{m['threshold_note']}",
          f"- text encoder: {m['text_encoder']}; device {m['device']}, {m['torch_threads']} threads",
          f"- git: {m['git']['commit'] or 'n/a'}{' (uncommitted changes)' if m['git']['dirty'] else ''}; "
          f"wall time {m['timings_s']['total']:.0f} s ({m['seconds_per_study']} s/study)", ""]
    internal = "internal" in m.get("sets", ["internal"])
    if not internal:
        L += [f"Sets run: {', '.join(m.get('sets', []))} (the internal held-out set was not run).", ""]
        L += render_bytes_markdown(res).splitlines()
        L += ["", "## Data sources", ""] + [f"- {s}" for s in res["sources"]]
        L += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in m["timings_s"].items()), ""]
        return "\n".join(L)
    L += ["## Classification vs bytes", "",
          "AUC with bootstrap 95 % CI; sensitivity / specificity / F1 at the threshold above; mean bytes per study "
          "(artifact measured by serialising it, incl. header and context layer; original file; raw pixels "
          "bit-packed).", "",
          "| keep | condition | n (pos/neg) | AUC [95 % CI] | sens | spec | F1 | artifact B | original B | raw B "
          "| kept |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["main"]:
        L.append(f"| {_fmt_keep(r['keep'])} | {r['label']} | {r['n']} ({r['n_pos']}/{r['n_neg']}) | {_auc_ci(r)} "
                 f"| {_f(r['sensitivity'])} | {_f(r['specificity'])} | {_f(r['f1'])} "
                 f"| {_bytes(r['mean_artifact_bytes'])} | {_bytes(r['mean_original_bytes'])} "
                 f"| {_bytes(r['mean_raw_bytes'])} | {_f(r['mean_fraction_kept'])} |")
    L += ["", "The **oracle** row reads the study's *given* report (salience and knowledge graph). For Kermany the "
          "given report is a template written from the label, so the label comes from the report: an upper bound, "
          "not a result. The **transfer baseline** row is the plain answer NEURAL must beat: the same frozen "
          "ImageNet backbone, mean+max pooled over the whole uncompressed image at 224 px, logistic regression "
          "(C = 0.01, balanced) trained on the same studies; its bytes are the original file's, at every keep.", ""]
    from .external import render_external

    L += render_external(res.get("external"))
    L += ["## Codec baselines at the same byte budget", "",
          "Each image compressed to at most its own NEURAL artifact's size at that keep, decoded, then classified by "
          "the image-only NEURAL classifier at keep 1.0 (salience recomputed on the decoded image). "
          "'over budget' counts images where even the lowest quality was larger than the budget (the smallest "
          "encoding was used).", "",
          "| keep | codec | n | AUC [95 % CI] | sens | spec | F1 | mean bytes | mean budget | over budget "
          "| mean quality |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["codecs"]:
        q = {"jpeg2000": "rate ", "jpegxl": "distance "}.get(r["codec"], "") + _f(r["mean_quality"], 1)
        L.append(f"| {_fmt_keep(r['keep'])} | {r['label']} | {r['n']} | {_auc_ci(r)} | {_f(r['sensitivity'])} "
                 f"| {_f(r['specificity'])} | {_f(r['f1'])} | {_bytes(r['mean_bytes'])} "
                 f"| {_bytes(r['mean_budget_bytes'])} | {r['n_over_budget']} | {q} |")
    rg = res["report_generation"]
    L += ["", "## Report generation", "", f"{rg['n']} held-out studies with real text. {rg.get('note', '')}. "
          "BLEU: sacrebleu corpus BLEU-n (13a, lower-cased) as a fraction; ROUGE-L: mean F; CheXpert F1: micro-F1 "
          "over positive labels (14 labels, our labeler) of generated vs given text.", "",
          "| source | keep | n | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CheXpert F1 | words |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rg["rows"]:
        L.append(f"| {r['source']} | {_fmt_keep(r['keep'])} | {r['n']} | {_f(r['bleu1'])} | {_f(r['bleu2'])} "
                 f"| {_f(r['bleu3'])} | {_f(r['bleu4'])} | {_f(r['rouge_l'])} | {_f(r['chexpert_f1'])} "
                 f"| {_f(r['mean_words'], 1)} |")
    L += ["", f"## Fusion ablation (keep {_fmt_keep(ABLATION_KEEP)}, generated reports)", "",
          "| fusion | n | AUC [95 % CI] | sens | spec | F1 |", "|---|---|---|---|---|---|"]
    for r in res["ablation"]:
        L.append(f"| {r['mode']} | {r['n']} | {_auc_ci(r)} | {_f(r['sensitivity'])} | {_f(r['specificity'])} "
                 f"| {_f(r['f1'])} |")
    if not res["ablation"]:
        L.append(f"| (keep {_fmt_keep(ABLATION_KEEP)} not in --keeps) | | | | | |")
    if res.get("fullsize") or res.get("dicom_bytes") or res.get("bytes_by_source_type"):
        L += [""] + render_bytes_markdown(res).splitlines()
    if res["failed"]:
        L += ["", "## Studies that failed", ""] + [f"- `{f['study_id']}`: {f['error']}" for f in res["failed"]]
    L += ["", "## Data sources", ""] + [f"- {s}" for s in res["sources"]]
    L += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in m["timings_s"].items()), ""]
    return "\n".join(L)


def _method_label(key: str) -> str:
    return CONDITION_LABELS.get(key) or CODEC_LABELS.get(key) or key


def render_bytes_markdown(res: dict) -> str:
    """The bytes part of the evaluation: AUC vs mean bytes per set (every method), the full-size set's per-source
    sensitivity / specificity, bytes per study by source type, and the DICOMs' bytes. Also written alone as
    ``bytes.md`` (the model card's Bytes section is this file)."""
    m = res["meta"]
    L = ["## AUC vs bytes", "",
         "NEURAL at each keep (artifact bytes measured by serialising it, header and context layer included) and "
         "every codec compressing the *whole image* to at most that study's artifact size, then classified by the "
         "image-only classifier at keep 1.0 (see 'Codec baselines'). AUC with a bootstrap 95 % CI; mean bytes per "
         "study.", ""]
    sets = []
    if "internal" in m.get("sets", ["internal"]) and res.get("main"):
        sets.append(("internal", res["main"], res["codecs"]))
    fs = res.get("fullsize")
    if fs and fs.get("main"):
        sets.append(("fullsize", fs["main"], fs["codecs"]))
    for name, main, codecs in sets:
        L += [f"### {SET_LABELS[name]}", ""]
        if name == "fullsize":
            L += [f"> **{fs['note']}**", "",
                  f"Studies: {fs['subset']} ({fs['how']}); composition: "
                  + ", ".join(f"{k} {v}" for k, v in fs["composition"].items()) + ".", ""]
        L += ["| keep | method | n (pos/neg) | AUC [95 % CI] | mean bytes |", "|---|---|---|---|---|"]
        for keep in m["keeps"]:
            for r in main:
                if r["keep"] == keep and r["condition"] in ("image_only", "generated_report"):
                    L.append(f"| {_fmt_keep(keep)} | {r['label']} | {r['n']} ({r['n_pos']}/{r['n_neg']}) "
                             f"| {_auc_ci(r)} | {_bytes(r['mean_artifact_bytes'])} |")
            for r in codecs:
                if r["keep"] == keep:
                    L.append(f"| {_fmt_keep(keep)} | {r['label']} (whole image) | {r['n']} | {_auc_ci(r)} "
                             f"| {_bytes(r['mean_bytes'])} |")
        base = next((r for r in main if r["condition"] == "baseline"), None)
        if base:
            L.append(f"| – | {base['label']} | {base['n']} ({base['n_pos']}/{base['n_neg']}) | {_auc_ci(base)} "
                     f"| {_bytes(base['mean_artifact_bytes'])} (original file) |")
        L.append("")
        if name == "fullsize" and fs.get("per_source"):
            cols = sorted({k for r in fs["per_source"] for k in r if k not in ("keep", "method")})
            L += ["Per source, at the shipped thresholds (proportion [Wilson 95 % CI], n):", "",
                  "| keep | method | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
            for r in fs["per_source"]:
                cells = []
                for c in cols:
                    v = r.get(c)
                    cells.append(f"{_f(v['value'])} [{_f(v['ci_low'])}, {_f(v['ci_high'])}] ({v['n']})" if v
                                 else "–")
                L.append(f"| {_fmt_keep(r['keep'])} | {_method_label(r['method'])} | " + " | ".join(cells) + " |")
            L.append("")
    by = res.get("bytes_by_source_type") or []
    if by:
        L += ["### Bytes per study by source type", "",
              "Every study evaluated in this run (each counted once), the DICOMs included: mean source file, mean "
              "NEURAL artifact (context layer included), mean of artifact / source, and how many artifacts meet "
              "'artifact <= keep x source + 1 KB' (the target for JPEG sources).", "",
              "| source type | keep | n | source B | artifact B | artifact / source | <= keep x source + 1 KB |",
              "|---|---|---|---|---|---|---|"]
        for r in by:
            L.append(f"| {r['source_type']} | {_fmt_keep(r['keep'])} | {r['n']} | {_bytes(r['mean_source_bytes'])} "
                     f"| {_bytes(r['mean_artifact_bytes'])} | {_f(r['mean_ratio'])} | {r['n_within_target']}/{r['n']} |")
        L.append("")
    dic = res.get("dicom_bytes") or []
    if dic:
        L += ["### DICOMs (no labels: bytes only)", "",
              "| file | size | bits | keep | source B | artifact B | artifact / source | patch coding |",
              "|---|---|---|---|---|---|---|---|"]
        for d in dic:
            for kk, r in d["keeps"].items():
                L.append(f"| {d['file']} | {d['width']}x{d['height']} | {d['bit_depth']} | {kk} "
                         f"| {_bytes(r['original_file_bytes'])} | {_bytes(r['artifact_bytes'])} "
                         f"| {_f(r['artifact_bytes'] / r['original_file_bytes'])} | {r['patch_encoding']} |")
        L.append("")
    return "\n".join(L)


def chart_series(res: dict) -> list[dict]:
    """The lines of the AUC-vs-bytes chart: one per (set, method) with at least one finite point, sorted by
    bytes. Each ``{"set", "method", "name", "x", "y", "lo", "hi", "keeps"}``; the oracle is left out (an upper
    bound, not a method)."""
    m = res["meta"]
    groups = []
    if "internal" in m.get("sets", ["internal"]):
        groups.append(("internal", res.get("main") or [], res.get("codecs") or []))
    if res.get("fullsize"):
        groups.append(("fullsize", res["fullsize"].get("main") or [], res["fullsize"].get("codecs") or []))
    out = []
    for set_name, main, codecs in groups:
        per = [(cond, [r for r in main if r["condition"] == cond], "mean_artifact_bytes")
               for cond in ("image_only", "generated_report")]
        per += [(codec, [r for r in codecs if r["codec"] == codec], "mean_bytes") for codec in CODECS]
        for method, rows, xkey in per:
            rows = sorted((r for r in rows if r.get("auc") is not None and math.isfinite(r["auc"])
                           and r.get(xkey) is not None and math.isfinite(r[xkey])), key=lambda r: r[xkey])
            if not rows:
                continue
            out.append({"set": set_name, "method": method,
                        "name": f"{_method_label(method)} — {SET_LABELS[set_name].split(' (')[0]}",
                        "x": [r[xkey] for r in rows], "y": [r["auc"] for r in rows],
                        "lo": [r["ci_low"] if r.get("ci_low") is not None else r["auc"] for r in rows],
                        "hi": [r["ci_high"] if r.get("ci_high") is not None else r["auc"] for r in rows],
                        "keeps": [r["keep"] for r in rows]})
    return out


CHART_HEIGHT = 600
CHART_WIDTH = 960


def _chart_title(res: dict) -> str:
    title = "NEURAL vs whole-image codecs: pneumonia ROC-AUC against mean bytes per image (held-out studies)"
    if res.get("fullsize"):
        title += "<br>full-size set mixes sources (positives covid-cxr, negatives mostly JSRT): AUC confounded"
    if res.get("warnings"):
        title = "WARNING: " + " / ".join(res["warnings"])[:160] + "<br>" + title
    return title


def render_html(res: dict, path: Path) -> None:
    """One plotly chart, AUC against mean bytes (log), every method a line (colour), every set a dash style;
    explicit height and width."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for sr in chart_series(res):
        up = [h - y for h, y in zip(sr["hi"], sr["y"])]
        down = [y - lo for y, lo in zip(sr["y"], sr["lo"])]
        fig.add_trace(go.Scatter(
            x=sr["x"], y=sr["y"], mode="lines+markers", name=sr["name"],
            text=[f"keep {_fmt_keep(k)}" for k in sr["keeps"]],
            line=dict(color=METHOD_COLOURS.get(sr["method"]), dash=SET_DASH[sr["set"]]),
            error_y=dict(type="data", array=up, arrayminus=down, visible=True, thickness=1),
            hovertemplate="%{text}<br>%{x:,.0f} bytes<br>AUC %{y:.3f}<extra>" + sr["name"] + "</extra>"))
    fig.update_layout(title=dict(text=_chart_title(res), font=dict(size=13)), height=CHART_HEIGHT, width=CHART_WIDTH,
                      xaxis=dict(type="log", title="mean bytes per image (log)"),
                      yaxis=dict(title="ROC-AUC (95 % CI)", range=[0, 1.02]), template="plotly_white",
                      legend=dict(orientation="v", font=dict(size=10)))
    fig.add_annotation(text="Data: Kermany et al. 2018 (CC BY 4.0); COVID-19 image data collection (Cohen et al.); "
                            "JSRT (Shiraishi et al. 2000). " + NOT_CLINICAL, xref="paper", yref="paper", x=0, y=-0.14,
                       showarrow=False, font=dict(size=10))
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    render_html.figure = fig         # the last figure, for render_png's kaleido path


def render_png(res: dict, path: Path) -> str:
    """The chart's data as a PNG: plotly's static export when kaleido is installed, else matplotlib (same series,
    colours and dash styles). Returns which one wrote it."""
    try:
        import kaleido  # noqa: F401

        fig = getattr(render_html, "figure", None)
        if fig is not None:
            fig.write_image(str(path), height=CHART_HEIGHT, width=CHART_WIDTH)
            return "plotly/kaleido"
    except Exception:       # no kaleido (or no browser for it): matplotlib draws the same data
        pass
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(CHART_WIDTH / 100, CHART_HEIGHT / 100), dpi=100)
    dash = {"solid": "-", "dash": "--"}
    for sr in chart_series(res):
        y = sr["y"]
        ax.errorbar(sr["x"], y, yerr=[[a - b for a, b in zip(y, sr["lo"])], [b - a for a, b in zip(y, sr["hi"])]],
                    label=sr["name"], color=METHOD_COLOURS.get(sr["method"]), linestyle=dash[SET_DASH[sr["set"]]],
                    marker="o", markersize=3, capsize=2, linewidth=1.2, elinewidth=0.6)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean bytes per image (log)")
    ax.set_ylabel("ROC-AUC (95 % CI)")
    ax.set_title(_chart_title(res).replace("<br>", "\n"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.005, NOT_CLINICAL + " Static copy drawn with matplotlib (no kaleido).", fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def write_outputs(res: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "bytes_md": out / "bytes.md",
             "html": out / "auc_vs_bytes.html", "png": out / "auc_vs_bytes.png"}
    clean = json.loads(json.dumps(json_clean(res), allow_nan=False))      # None for NaN from here on
    render_html(clean, paths["html"])
    clean["meta"]["chart_png"] = res["meta"]["chart_png"] = render_png(clean, paths["png"])
    atomic_write_text(paths["json"], json.dumps(json_clean(res), indent=1, allow_nan=False))
    atomic_write_text(paths["md"], render_markdown(clean))
    atomic_write_text(paths["bytes_md"], render_bytes_markdown(clean) + "\n")
    return paths


def summary_table(res: dict) -> str:
    res = json_clean(res)
    lines = []
    for w in res.get("warnings", []):
        lines.append(f"WARNING: {w}")
    lines.append(f"{'keep':>6}  {'method':<40} {'AUC [95% CI]':<24} {'mean bytes':>12}")
    for r in res["main"]:
        lines.append(f"{_fmt_keep(r['keep']):>6}  {r['label']:<40} {_auc_ci(r):<24} "
                     f"{_bytes(r['mean_artifact_bytes']):>12}")
    for r in res["codecs"]:
        lines.append(f"{_fmt_keep(r['keep']):>6}  {r['label'] + ' (same budget)':<40} {_auc_ci(r):<24} "
                     f"{_bytes(r['mean_bytes']):>12}")
    fs = res.get("fullsize")
    if fs and fs.get("main"):
        lines.append(f"full-size set ({fs['subset']}; SOURCE-CONFOUNDED AUC, see the per-source table):")
        for r in fs["main"]:
            lines.append(f"{_fmt_keep(r['keep']):>6}  {r['label']:<40} {_auc_ci(r):<24} "
                         f"{_bytes(r['mean_artifact_bytes']):>12}")
        for r in fs["codecs"]:
            lines.append(f"{_fmt_keep(r['keep']):>6}  {r['label'] + ' (same budget)':<40} {_auc_ci(r):<24} "
                         f"{_bytes(r['mean_bytes']):>12}")
    full = next((r for r in res["report_generation"]["rows"] if r["source"] == "full image"), None)
    if full:
        lines.append(f"report generation (full image, n={full['n']}): BLEU-4 {_f(full['bleu4'])}, "
                     f"ROUGE-L {_f(full['rouge_l'])}, CheXpert F1 {_f(full['chexpert_f1'])}")
    return "\n".join(lines)
