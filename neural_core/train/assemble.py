"""Assemble a model bundle from the trained parts (fp16 safetensors) and write its ``model.json``.

    python -m neural_core.train.assemble --decoder runs/decoder/best --classifiers runs/clf2 \\
        --lung assets/lung_model --split assets/default_model/split.json --out assets/default_model

``--classifiers DIR`` holds ``classifier_<name>/``, ``results_<name>.json`` (validation AUC, threshold) and
``baseline/`` from :mod:`neural_core.train.classifier`; ``--also name=DIR`` takes one classifier from another run.

``--base BUNDLE`` starts from an existing bundle instead and replaces only the classifiers named by ``--also`` (their
weights, thresholds, validation AUC and provenance); everything else, ``model.json``'s record of how the report
model was trained included, is the base's:

    python -m neural_core.train.assemble --base assets/default_model --also image=runs/ens --out runs/bundle_x \
        --version neural-lite0-20261202x
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..bundle import ModelBundle
from ..models.baseline import TransferBaseline
from ..models.ensemble import ClassifierEnsemble, load_classifier
from ..models.report_model import ReportModel
from ..models.tokenizer import load_tokenizer


def _init_name(init: str | None) -> str | None:
    """Where a fine-tuned decoder started: the release whose report model it was, when that is known."""
    if not init:
        return None
    info = Path(init).parent / "model.json"
    try:
        return f"the report model of {json.loads(info.read_text())['version']}"
    except (OSError, ValueError, KeyError):
        return Path(init).name


def _training_record(log_file: Path) -> dict:
    """How the report model was trained (weak attention supervision, burned-in copies, start model), from the
    decoder trainer's ``log.jsonl``; empty when there is none."""
    training: dict = {}
    if not log_file.is_file():
        return training
    for line in log_file.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("event") == "start":
            a = ev.get("args", {})
            training = {"attn_weight": a.get("attn_weight", 0.0), "attn_targets": a.get("targets"),
                        "burn_in_copies": ev.get("burn_in_copies", 0), "aug_p": a.get("aug_p"),
                        "epochs": a.get("epochs"), "covid_oversample": a.get("covid_oversample"),
                        "density_share": a.get("density_share") if "density" in str(a.get("targets")) else None,
                        "zone_aug": a.get("zone_aug", 0.0), "zone_weight": a.get("zone_weight", 1.0),
                        "zone_from_mention": a.get("zone_from_mention", False),
                        "windows": a.get("windows", False),
                        "notes_target": a.get("notes_target", "note"),
                        # recorded at training time; else read now from the folder (may have moved on since)
                        "init": ev.get("init_release") or _init_name(a.get("init"))}
        elif ev.get("event") == "epoch" and "val_mass_in_lung" in ev:
            training.setdefault("val_per_epoch", []).append(
                {k: ev.get(k) for k in ("epoch", "val_loss", "val_attn_loss", "val_mass_in_lung", "val_pointing",
                                        "val_mass_in_density") if k in ev})
    return training


def _lung_line(lung) -> str:
    """The lung model's held-out Dice (recorded in its config by neural_core.train.lung) as one data line."""
    d = (lung.cfg.metrics or {}).get("held_out_dice", {})
    parts = [f"{src} " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()) for src, m in d.items()]
    return "lung model (neural_core.train.lung): held-out Dice " + ("; ".join(parts) if parts else "not recorded")


def _ensemble_line(name: str, size: int) -> str:
    return (f"classifier {name}: the mean probability of {size} runs of one recipe on the same views (seeds; "
            "neural_core.models.ensemble), threshold chosen on the ensemble's validation scores")


def swap_classifiers(base: Path, out: Path, also: dict[str, Path], *, version: str,
                     findings: str | None = None, generated=None) -> Path:
    """Copy bundle ``base`` to ``out`` with the classifiers in ``also`` (name -> train.classifier folder holding
    ``classifier_<name>/`` and ``results_<name>.json``) replaced, and ``model.json`` updated (version, threshold,
    validation AUC, source, ensemble size, data lines; ``replaced_from``: the base's version). Written beside ``out``
    first and moved into place at the end, so ``out`` may be ``base`` and a failure leaves ``out`` as it was.

    ``findings`` (:attr:`~neural_core.config.SalienceConfig.findings`) sets the finding-word rule of the bundle's maps;
    a replacing classifier must have been trained on cuts made by the rule the maps will use (its training map is
    recorded under ``"classifier_training_salience_of"``).

    ``generated`` (a :class:`~neural_core.config.SalienceConfig`) becomes the map of the model's own reports
    (``"salience_generated"``: what the app reads for an image alone); the ``also`` classifiers must then have been
    trained on that map's cuts, not the base classifiers' map. Classifiers not replaced keep what they were trained
    on, and ``model.json`` says so."""
    from ..config import FINDING_RULES, SalienceConfig
    from ..stages import CLASSIFIER_NAMES

    if findings is not None and findings not in FINDING_RULES:
        raise SystemExit(f"--findings must be one of {FINDING_RULES}, got {findings!r}")
    info = json.loads((base / "model.json").read_text())
    base_trained = info.get("classifier_training_salience")
    rule = findings or (SalienceConfig.from_dict(base_trained).findings if base_trained else None)
    unknown = set(also) - set(CLASSIFIER_NAMES)
    if unknown:
        raise SystemExit(f"unknown classifier name(s) {sorted(unknown)}; the registry holds {CLASSIFIER_NAMES}")
    if generated is not None:
        gen_d = SalienceConfig.from_dict(generated.to_dict() | ({"findings": findings} if findings else {})).to_dict()
    tmp = out.parent / f".{out.name}.assembling"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    try:
        lines = list(info.get("data", []))
        ensembles = dict(info.get("classifier_ensembles", {}))
        for name, d in sorted(also.items()):
            clf = load_classifier(d / f"classifier_{name}")
            res = json.loads((d / f"results_{name}.json").read_text())
            trained_with = res.get("salience")
            key = ("method", "layers", "head_reduce")
            if generated is not None:
                if not trained_with or [trained_with.get(k) for k in key] != [gen_d.get(k) for k in key]:
                    raise SystemExit(f"{d}: classifier {name} was trained on another map than the new map of the "
                                     f"model's own reports ({trained_with} vs {gen_d})")
            elif trained_with and info.get("classifier_training_salience"):
                if [trained_with.get(k) for k in key] != [info["classifier_training_salience"].get(k) for k in key]:
                    raise SystemExit(f"{d}: classifier {name} was trained on another map than the base's classifiers "
                                     f"({trained_with} vs {info['classifier_training_salience']})")
            if trained_with:
                own = SalienceConfig.from_dict(trained_with).findings
                if rule is not None and own != rule:
                    raise SystemExit(f"{d}: classifier {name} was trained on cuts whose finding words follow the "
                                     f"{own!r} rule; the bundle's maps use {rule!r} (--findings)")
                info.setdefault("classifier_training_salience_of", {})[name] = trained_with
            if bool(getattr(clf.cfg, "zone_features", False)) != (name in info.get("classifier_zone_features", [])):
                raise SystemExit(f"{d}: classifier {name} differs from the base's in zone features")
            shutil.rmtree(tmp / f"classifier_{name}", ignore_errors=True)
            clf.save_pretrained(tmp / f"classifier_{name}", fp16=True)
            info.setdefault("thresholds", {})[name] = res["threshold"]
            info.setdefault("val_auc", {})[name] = res["val_auc"]
            info.setdefault("sources", {})[name] = str(d)
            lines = [ln for ln in lines if not ln.startswith(f"classifier {name}: the mean probability")]
            if isinstance(clf, ClassifierEnsemble):
                ensembles[name] = clf.size
                lines.append(_ensemble_line(name, clf.size))
            else:
                ensembles.pop(name, None)
        if findings is not None:
            for key in ("salience", "salience_generated"):
                if info.get(key):
                    info[key] = {**info[key], "findings": findings}
            lines = [ln for ln in lines if not ln.startswith("maps: finding words")]
            lines.append(f"maps: finding words by the {findings!r} rule (SalienceConfig.findings); classifiers "
                         "not replaced keep the cuts they were trained on")
        if generated is not None:
            info["salience_generated"] = gen_d
            lines = [ln for ln in lines if not ln.startswith("maps: the model's own reports")]
            lines.append(f"maps: the model's own reports are read by {gen_d['method']} / layers "
                         f"{', '.join(str(x) for x in gen_d['layers'])} / {gen_d['head_reduce']} (salience_generated); "
                         f"classifier(s) {', '.join(sorted(also))} trained on its cuts, the others on "
                         "the cuts of the base's map")
        info["data"] = lines
        if ensembles:
            info["classifier_ensembles"] = ensembles
        else:
            info.pop("classifier_ensembles", None)
        info["replaced_from"] = {"version": info.get("version"), "classifiers": sorted(also)}
        info["version"] = version
        (tmp / "model.json").write_text(json.dumps(info, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="an existing bundle: keep all of it but the --also classifiers")
    ap.add_argument("--decoder", default=None)
    ap.add_argument("--classifiers", default=None)
    ap.add_argument("--also", action="append", default=[], help="name=DIR: take classifier NAME from run DIR")
    ap.add_argument("--lung", default=None)
    ap.add_argument("--density", default=None, help="density_atlas.json (or the feature folder holding it) of "
                    "neural_core.train.density: shipped beside the lung model for validate-salience's densest-lung "
                    "baseline (the attention teacher of --targets lung+zone+density)")
    ap.add_argument("--salience", default=None, help="model.json whose \"salience\" entry (validate-salience --choose) "
                    "the bundle keeps; pass the same file the classifier trainer's --salience read")
    ap.add_argument("--split", default=None)
    ap.add_argument("--findings", default=None, choices=("linked", "all"), help="with --base: the finding-word rule "
                    "of the new bundle's maps (SalienceConfig.findings); the --also classifiers must have been "
                    "trained on cuts made by it")
    ap.add_argument("--salience-generated", default=None, metavar="JSON", help="with --base: the map of the model's "
                    "own reports (the file's \"salience_generated\" entry, else its \"salience\"); the --also "
                    "classifiers must have been trained on its cuts")
    ap.add_argument("--classifier-note", default="", help="how the classifiers were trained when their results do "
                    "not record it (e.g. carried over from an earlier release), shown in the bundle's data list")
    ap.add_argument("--out", required=True)
    ap.add_argument("--version", default="neural-lite0-" + time.strftime("%Y%m%d"))
    args = ap.parse_args(argv)
    if args.base:
        if not args.also:
            ap.error("--base needs --also name=DIR (the classifiers to replace)")
        also = dict(a.split("=", 1) for a in args.also)
        generated = None
        if args.salience_generated:
            from .classifier import read_salience_config

            generated = read_salience_config(args.salience_generated, generated=True)
            if not generated.chosen_by:
                from dataclasses import replace

                generated = replace(generated, chosen_by=f"given by train.assemble --salience-generated "
                                                         f"{args.salience_generated}")
        out = swap_classifiers(Path(args.base), Path(args.out), {n: Path(d) for n, d in also.items()},
                               version=args.version, findings=args.findings, generated=generated)
        print(json.dumps({"out": str(out), "replaced": sorted(also)}, indent=1))
        return 0
    missing = [f"--{k}" for k in ("decoder", "classifiers", "split") if not getattr(args, k)]
    if missing:
        ap.error(f"{', '.join(missing)} required (or --base)")
    rm = ReportModel.from_pretrained(args.decoder)
    tok = load_tokenizer(Path(args.decoder) / "tokenizer")
    where = {n: Path(args.classifiers) for n in ("image", "report", "oracle")}
    for a in args.also:
        n, d = a.split("=", 1)
        where[n] = Path(d)
    clfs, thresholds, val_auc = {}, {}, {}
    for n, d in where.items():
        if (d / f"classifier_{n}").is_dir():
            clfs[n] = load_classifier(d / f"classifier_{n}")
            res = json.loads((d / f"results_{n}.json").read_text())
            thresholds[n], val_auc[n] = res["threshold"], res["val_auc"]
    base = TransferBaseline.load(Path(args.classifiers) / "baseline")
    bres = json.loads((Path(args.classifiers) / "results_baseline.json").read_text())
    thresholds["baseline"], val_auc["baseline"] = base.threshold, bres["val_auc"]
    lung = None
    if args.lung:
        from ..models.lung import LungModel

        lung = LungModel.from_pretrained(args.lung)
    density = None
    if args.density:
        from ..models.density import DensityAtlas

        if lung is None:
            raise SystemExit("--density ships beside the lung model: pass --lung too")
        density = DensityAtlas.load(args.density)
    training = _training_record(Path(args.decoder).parent / "log.jsonl")
    zone = sorted(n for n, c in clfs.items() if c.cfg.zone_features)
    ensembles = {n: c.size for n, c in clfs.items() if isinstance(c, ClassifierEnsemble)}
    info = {"name": "neural-lite0", "version": args.version, "trained": True, "thresholds": thresholds,
            "val_auc": val_auc, "split_file": "split.json",
            "encoder": rm.cfg.encoder, "report_model": rm.cfg.to_dict(),
            "report_model_training": training,
            "sources": {n: str(d) for n, d in where.items() if n in clfs},
            "classifier_zone_features": zone,
            **({"classifier_ensembles": ensembles} if ensembles else {}),
            "data": ["kermany-train (label-template reports; Kermany capped at 1300 studies per class)",
                     "covid-cxr (clinical notes)", "jsrt: the 154 nodule films as adult negatives (classifiers)",
                     "iu-reports (tokenizer text only)"]
            + (["report model: cross-attention weakly supervised towards the lung field and the zones a note names "
                "(lung field and zones = the prediction of the lung model of its training time on every training "
                "image, pediatric Kermany included; not annotations)"] if training.get("attn_weight") else [])
            + ([f"report model: for pneumonia-positive training studies the attention target is the densest "
                f"{training['density_share']:.0%} of the lung (density anomaly against an atlas of normal training "
                "films, neural_core.models.density), zones a note names kept"] if training.get("density_share") else [])
            + ([f"report model: fine-tuned from {training['init']}"] if training.get("init") else [])
            + ([f"report model: a synthetic sentence naming random zones appended to {training['zone_aug']:.0%} of "
                f"training reports (text loss masked; attention target = those zones of the image's lungs; named-zone "
                f"tokens weighted x{training['zone_weight']:g}"
                + (", from the first zone word on" if training.get("zone_from_mention") else "") + "): the "
                "attention of zone words follows the words, whatever the image shows"]
               if training.get("zone_aug") else [])
            + (["report model: long notes trained as their sentence-aligned windows (as salience reads them)"]
               if training.get("windows") else [])
            + (["report model: covid-cxr case notes trained as their sentences about the radiograph after an "
                "impression written from the label (neural_core.train.report_targets; the notes themselves are "
                "not what it learnt to write)"] if training.get("notes_target") == "findings" else [])
            + ([f"classifiers: {args.classifier_note}"] if args.classifier_note else [])
            + [_ensemble_line(n, k) for n, k in sorted(ensembles.items())]
            + ([f"report model: {training['burn_in_copies']} burned-in copies per training image (letters, markers, "
                "borders at random, both classes)"] if training.get("burn_in_copies") else [])
            + ([f"classifiers {', '.join(zone)}: + six lung-zone fractions per image node (lung model on the "
                "artifact)"] if zone else [])
            + ([_lung_line(lung)] if lung is not None else [])}
    if args.salience:
        from .classifier import read_salience_config

        info["salience"] = read_salience_config(args.salience).to_dict()
        gen = read_salience_config(args.salience, generated=True)
        if gen != read_salience_config(args.salience):
            info["salience_generated"] = gen.to_dict()
    trained_with = {n: json.loads((where[n] / f"results_{n}.json").read_text()).get("salience") for n in clfs}
    known = {json.dumps(v, sort_keys=True) for v in trained_with.values() if v}
    if len(known) == 1:
        info["classifier_training_salience"] = json.loads(known.pop())
        key = ("method", "layers", "head_reduce")
        # the classifiers cut their training artifacts with the model's own reports: compare that map
        if args.salience and [info["classifier_training_salience"].get(k) for k in key] != \
                [info.get("salience_generated", info["salience"]).get(k) for k in key]:
            print("warning: the classifiers were trained on artifacts cut by another salience map than the bundle's")
    if zone and lung is None:
        raise SystemExit("classifiers with zone features need the lung model in the bundle: pass --lung")
    out = Path(args.out)
    if out.exists():
        for sub in ("report", "classifier_image", "classifier_report", "classifier_oracle", "baseline", "lung"):
            shutil.rmtree(out / sub, ignore_errors=True)
    ModelBundle(rm, tok, clfs, info, baseline=base, lung=lung, density=density).save(out, fp16=True)
    if Path(args.split).resolve() != (out / "split.json").resolve():
        shutil.copy(args.split, out / "split.json")
    print(json.dumps({"out": str(out), "classifiers": sorted(clfs), "thresholds": thresholds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
