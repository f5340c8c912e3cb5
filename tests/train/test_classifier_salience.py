import json
from neural_core.train.classifier import read_salience_config
from neural_core.config import SalienceConfig
def test_read_salience_config_from_model_json_or_plain(tmp_path):
    a = tmp_path / "model.json"
    a.write_text(json.dumps({"version": "x", "salience": {"method": "attention", "layers": [1], "head_reduce": "mean"}}))
    # stored without "findings": the rule of the releases that wrote it
    assert read_salience_config(str(a)) == SalienceConfig(layers=(1,), findings="all")
    b = tmp_path / "s.json"
    b.write_text(json.dumps({"method": "entity", "layers": None, "head_reduce": "max"}))
    assert read_salience_config(str(b)) == SalienceConfig(method="entity", head_reduce="max", findings="all")
    b.write_text(json.dumps(SalienceConfig(method="entity").to_dict()))
    assert read_salience_config(str(b)) == SalienceConfig(method="entity")
    assert read_salience_config(None) == SalienceConfig()
