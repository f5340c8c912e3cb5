"""The evaluation's outputs: ``results.json`` (strict JSON, NaN as null), ``results.md``, ``auc_vs_bytes.html``
(plotly) and the console summary."""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import CONDITION_LABELS, NOT_CLINICAL, ABLATION_KEEP, fmt_keep as _fmt_keep
from .codecs import CODEC_LABELS, CODECS
from ..utils import atomic_write_text, json_clean

__all__ = ["render_markdown", "render_html", "write_outputs", "summary_table"]


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
    if res["failed"]:
        L += ["", "## Studies that failed", ""] + [f"- `{f['study_id']}`: {f['error']}" for f in res["failed"]]
    L += ["", "## Data sources", ""] + [f"- {s}" for s in res["sources"]]
    L += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in m["timings_s"].items()), ""]
    return "\n".join(L)


def render_html(res: dict, path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()

    def curve(rows, xkey, name, dash=None):
        rows = sorted((r for r in rows if r["auc"] is not None and math.isfinite(r["auc"] or float("nan"))
                       and r.get(xkey) and math.isfinite(r[xkey])), key=lambda r: r[xkey])
        if not rows:
            return
        x = [r[xkey] for r in rows]
        y = [r["auc"] for r in rows]
        up = [(r["ci_high"] - r["auc"]) if r["ci_high"] is not None and math.isfinite(r["ci_high"]) else 0
              for r in rows]
        down = [(r["auc"] - r["ci_low"]) if r["ci_low"] is not None and math.isfinite(r["ci_low"]) else 0
                for r in rows]
        text = [f"keep {_fmt_keep(r['keep'])}" for r in rows]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, text=text,
                                 error_y=dict(type="data", array=up, arrayminus=down, visible=True, thickness=1),
                                 line=dict(dash=dash) if dash else None,
                                 hovertemplate="%{text}<br>%{x:,.0f} bytes<br>AUC %{y:.3f}<extra>" + name + "</extra>"))

    for cond in ("image_only", "generated_report"):
        curve([r for r in res["main"] if r["condition"] == cond], "mean_artifact_bytes", CONDITION_LABELS[cond])
    for codec in CODECS:
        curve([r for r in res["codecs"] if r["codec"] == codec], "mean_bytes", CODEC_LABELS[codec])
    curve([r for r in res["main"] if r["condition"] == "oracle_given_report"], "mean_artifact_bytes",
          CONDITION_LABELS["oracle_given_report"], dash="dash")
    title = "NEURAL: pneumonia ROC-AUC vs mean bytes per image (held-out test split)"
    if res.get("warnings"):
        title = "WARNING: " + " / ".join(res["warnings"])[:160] + "<br>" + title
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=560, width=900,
                      xaxis=dict(type="log", title="mean bytes per image (log)"),
                      yaxis=dict(title="ROC-AUC (95 % CI)", range=[0, 1.02]), template="plotly_white",
                      legend=dict(orientation="v"))
    fig.add_annotation(text="Data: Kermany et al. 2018 (CC BY 4.0); COVID-19 image data collection (Cohen et al.). "
                            + NOT_CLINICAL, xref="paper", yref="paper", x=0, y=-0.16, showarrow=False,
                       font=dict(size=10))
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def write_outputs(res: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "html": out / "auc_vs_bytes.html"}
    atomic_write_text(paths["json"], json.dumps(json_clean(res), indent=1, allow_nan=False))
    clean = json.loads(paths["json"].read_text())       # None for NaN from here on
    atomic_write_text(paths["md"], render_markdown(clean))
    render_html(clean, paths["html"])
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
    full = next((r for r in res["report_generation"]["rows"] if r["source"] == "full image"), None)
    if full:
        lines.append(f"report generation (full image, n={full['n']}): BLEU-4 {_f(full['bleu4'])}, "
                     f"ROUGE-L {_f(full['rouge_l'])}, CheXpert F1 {_f(full['chexpert_f1'])}")
    return "\n".join(lines)
