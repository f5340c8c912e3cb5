"""Provenance the bundle assembler writes: where a fine-tuned report model started."""
import json

from neural_core.train.assemble import _init_name, _training_record


def test_init_name_reads_the_release_of_the_start_folder(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "model.json").write_text(json.dumps({"version": "neural-lite0-20261201b"}))
    assert _init_name(str(tmp_path / "report")) == "the report model of neural-lite0-20261201b"
    assert _init_name(None) is None
    assert _init_name(str(tmp_path / "nowhere" / "report")) == "report"      # no model.json: the folder's name


def test_training_record_prefers_the_release_named_when_training_started(tmp_path):
    """The folder --init points at may hold another release by the time the bundle is assembled (it did:
    assets/default_model moved from 20261201b to 20261201g under a decoder fine-tuned from b)."""
    start = tmp_path / "default_model"
    (start / "report").mkdir(parents=True)
    (start / "model.json").write_text(json.dumps({"version": "neural-lite0-20261201g"}))    # what it holds now
    log = tmp_path / "log.jsonl"
    ev = {"event": "start", "args": {"init": str(start / "report"), "epochs": 4, "targets": "lung+zone"}}
    log.write_text(json.dumps(ev) + "\n" + json.dumps({"event": "epoch", "val_mass_in_lung": 0.9, "epoch": 0}) + "\n")
    rec = _training_record(log)
    assert rec["init"] == "the report model of neural-lite0-20261201g" and rec["epochs"] == 4   # old logs: read now
    assert rec["val_per_epoch"] == [{"epoch": 0, "val_mass_in_lung": 0.9}]
    log.write_text(json.dumps(ev | {"init_release": "the report model of neural-lite0-20261201b"}) + "\n")
    assert _training_record(log)["init"] == "the report model of neural-lite0-20261201b"
    assert _training_record(tmp_path / "absent.jsonl") == {}
    assert _training_record(log)["notes_target"] == "note"                  # logs before the option: whole notes
    log.write_text(json.dumps(ev | {"args": ev["args"] | {"notes_target": "findings"}}) + "\n")
    assert _training_record(log)["notes_target"] == "findings"


def test_classifiers_read_the_map_of_the_models_own_reports(tmp_path):
    """Classifier training cuts its artifacts with the model's own reports: it reads ``salience_generated`` when a
    bundle has one; the given-report map otherwise."""
    from neural_core.config import SalienceConfig
    from neural_core.train.classifier import read_salience_config

    p = tmp_path / "model.json"
    p.write_text(json.dumps({"salience": {"method": "located", "layers": [1]}}))
    assert read_salience_config(str(p), generated=True) == read_salience_config(str(p)) == \
        SalienceConfig("located", (1,), findings="all")
    p.write_text(json.dumps({"salience": {"method": "located", "layers": [1]},
                             "salience_generated": {"method": "entity", "layers": [0]}}))
    assert read_salience_config(str(p)) == SalienceConfig("located", (1,), findings="all")
    assert read_salience_config(str(p), generated=True) == SalienceConfig("entity", (0,), findings="all")
    assert read_salience_config(None, generated=True) == SalienceConfig()


def test_swap_classifiers_replaces_one_role_and_keeps_the_rest(tmp_path):
    """``assemble --base``: a release with only its image classifier replaced (here by a seed ensemble); the rest of
    the bundle and its record are the base's, and a refused swap leaves the target as it was."""
    import pytest
    import torch

    from neural_core.bundle import load_bundle, untrained_bundle
    from neural_core.config import ClassifierConfig, tiny_report_config
    from neural_core.models.classifier import NeuralClassifier
    from neural_core.models.ensemble import ClassifierEnsemble
    from neural_core.train.assemble import main, swap_classifiers

    base = tmp_path / "base"
    b = untrained_bundle(tiny_report_config())
    b.info.update({"thresholds": {"image": 0.5, "report": 0.5}, "val_auc": {"image": 0.8}, "data": ["kept line"],
                   "classifier_training_salience": {"method": "entity", "layers": [1], "head_reduce": "mean"}})
    b.save(base, fp16=False)
    run = tmp_path / "ens"
    torch.manual_seed(0)
    ClassifierEnsemble([NeuralClassifier(ClassifierConfig()) for _ in range(3)]).save_pretrained(run / "classifier_image")
    (run / "results_image.json").write_text(json.dumps({
        "threshold": 0.42, "val_auc": 0.9, "salience": {"method": "entity", "layers": [1], "head_reduce": "mean"}}))
    out = swap_classifiers(base, tmp_path / "out", {"image": run}, version="v-new")
    info = json.loads((out / "model.json").read_text())
    assert info["version"] == "v-new" and info["replaced_from"] == {"version": "0", "classifiers": ["image"]}
    assert info["thresholds"] == {"image": 0.42, "report": 0.5} and info["val_auc"]["image"] == 0.9
    assert info["classifier_ensembles"] == {"image": 3} and info["data"][0] == "kept line"
    assert any(line.startswith("classifier image: the mean probability of 3 runs") for line in info["data"])
    loaded = load_bundle(out, device="cpu")
    assert isinstance(loaded.classifiers["image"], ClassifierEnsemble)
    assert isinstance(loaded.classifiers["report"], NeuralClassifier)
    assert (out / "report").is_dir() and json.loads((base / "model.json").read_text())["version"] == "0"
    # a classifier trained on another map is refused, and the target keeps what it had
    (run / "results_image.json").write_text(json.dumps({"threshold": 0.1, "val_auc": 0.9,
                                                        "salience": {"method": "located", "layers": [1]}}))
    with pytest.raises(SystemExit, match="another map"):
        swap_classifiers(out, out, {"image": run}, version="v-bad")
    assert json.loads((out / "model.json").read_text())["version"] == "v-new"
    assert not list(tmp_path.glob(".*assembling"))
    with pytest.raises(SystemExit):
        main(["--base", str(out), "--out", str(tmp_path / "x")])             # nothing to replace


def test_swap_classifiers_checks_and_sets_the_finding_rule(tmp_path):
    """``assemble --base ... --findings linked``: the maps read finding words by the new rule, and only classifiers
    trained on cuts made by that rule may replace the base's (a setting stored without the rule reads "all")."""
    import pytest
    import torch

    from neural_core.bundle import load_bundle, untrained_bundle
    from neural_core.config import ClassifierConfig, SalienceConfig, tiny_report_config
    from neural_core.models.classifier import NeuralClassifier
    from neural_core.train.assemble import swap_classifiers

    base = tmp_path / "base"
    b = untrained_bundle(tiny_report_config())
    b.info.update({"thresholds": {"image": 0.5}, "val_auc": {"image": 0.8},
                   "salience": {"method": "located", "layers": [1], "head_reduce": "mean"},
                   "classifier_training_salience": {"method": "entity", "layers": [1], "head_reduce": "mean"}})
    b.save(base, fp16=False)
    run = tmp_path / "clf"
    torch.manual_seed(0)
    NeuralClassifier(ClassifierConfig()).save_pretrained(run / "classifier_image")
    linked = SalienceConfig(method="entity", layers=(1,)).to_dict()
    (run / "results_image.json").write_text(json.dumps({"threshold": 0.3, "val_auc": 0.9, "salience": linked}))
    with pytest.raises(SystemExit, match="'linked' rule; the bundle's maps use 'all'"):
        swap_classifiers(base, tmp_path / "out", {"image": run}, version="v1")     # the base's maps read "all"
    out = swap_classifiers(base, tmp_path / "out", {"image": run}, version="v1", findings="linked")
    info = json.loads((out / "model.json").read_text())
    assert info["salience"]["findings"] == "linked" and info["classifier_training_salience_of"]["image"] == linked
    assert load_bundle(out, device="cpu").salience == SalienceConfig("located", (1,), "mean", findings="linked")
    assert any(line.startswith("maps: finding words by the 'linked' rule") for line in info["data"])
    assert load_bundle(base, device="cpu").salience.findings == "all"                  # the base is untouched
    with pytest.raises(SystemExit, match="must be one of"):
        swap_classifiers(base, tmp_path / "out2", {"image": run}, version="v2", findings="some")


def test_swap_classifiers_sets_the_map_of_the_models_own_reports(tmp_path):
    """``assemble --base ... --salience-generated``: the image classifier is replaced by one trained on the cuts of a
    new own-report map; the given-report map and the other classifiers stay the base's, and a classifier trained on
    another map than the new one is refused."""
    import pytest
    import torch

    from neural_core.bundle import load_bundle, untrained_bundle
    from neural_core.config import ClassifierConfig, SalienceConfig, tiny_report_config
    from neural_core.models.classifier import NeuralClassifier
    from neural_core.train.assemble import main

    base = tmp_path / "base"
    b = untrained_bundle(tiny_report_config())
    given = {"method": "located", "layers": [1], "head_reduce": "mean"}
    b.info.update({"thresholds": {"image": 0.5, "report": 0.5}, "val_auc": {"image": 0.8}, "salience": given,
                   "classifier_training_salience": {"method": "located", "layers": [1], "head_reduce": "mean"}})
    b.save(base, fp16=False)
    run = tmp_path / "clf"
    torch.manual_seed(0)
    NeuralClassifier(ClassifierConfig()).save_pretrained(run / "classifier_image")
    l0 = {"method": "entity", "layers": [0], "head_reduce": "mean"}
    (run / "results_image.json").write_text(json.dumps({"threshold": 0.3, "val_auc": 0.9, "salience": l0}))
    (tmp_path / "sal.json").write_text(json.dumps({"salience": l0}))
    with pytest.raises(SystemExit, match="another map than the base's"):
        main(["--base", str(base), "--also", f"image={run}", "--out", str(tmp_path / "no")])
    out = tmp_path / "out"
    assert main(["--base", str(base), "--also", f"image={run}", "--out", str(out), "--version", "v2",
                 "--salience-generated", str(tmp_path / "sal.json")]) == 0
    info = json.loads((out / "model.json").read_text())
    loaded = load_bundle(out, device="cpu")
    assert loaded.salience_generated == SalienceConfig("entity", (0,), "mean", findings="all",
                                                       chosen_by=f"given by train.assemble --salience-generated "
                                                                 f"{tmp_path / 'sal.json'}")
    assert loaded.salience == SalienceConfig("located", (1,), "mean", findings="all")           # given reports: base's
    assert info["thresholds"] == {"image": 0.3, "report": 0.5} and info["classifier_training_salience_of"]["image"] == l0
    assert any(ln.startswith("maps: the model's own reports are read by entity / layers 0 / mean") for ln in info["data"])
    (tmp_path / "sal2.json").write_text(json.dumps({"salience": {"method": "entity", "layers": [1]}}))
    with pytest.raises(SystemExit, match="new map of the model's own reports"):
        main(["--base", str(base), "--also", f"image={run}", "--out", str(tmp_path / "no2"),
              "--salience-generated", str(tmp_path / "sal2.json")])
    assert not (tmp_path / "no2").exists()
