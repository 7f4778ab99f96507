"""The quantization-aware-training configs (reference §3.2): defaults, .cfg resolution and the
validation of hand-edited JSON."""
import json

import pytest

from amct_core.errors import AmctFileNotFoundError, ConfigError
from amct_core.quant.layers import QuantLayer
from amct_core.quant.retrain_config import (
    build_retrain_config,
    build_retrain_config_from_cfg,
    load_retrain_config,
    retrain_config_from_dict,
    write_retrain_config,
)

LAYERS = [QuantLayer("conv1", "Conv2d", "conv"), QuantLayer("layer1.conv", "Conv2d", "conv"),
          QuantLayer("pool", "AvgPool2d", "avgpool"), QuantLayer("up", "ConvTranspose2d",
                                                                 "conv_transpose"),
          QuantLayer("fc", "Linear", "linear")]


def test_default_config_matches_the_reference_layout():
    data = build_retrain_config(LAYERS, after_relu=["layer1.conv"], batch_num=2,
                                skip_layers=["up"])
    assert list(data) == ["version", "batch_num", "conv1", "layer1.conv", "up", "fc"]
    assert data["batch_num"] == 2
    assert data["conv1"] == {
        "retrain_enable": True,
        "retrain_data_config": {"algo": "ulq_quantize", "dst_type": "INT8"},
        "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True,
                                  "dst_type": "INT8"}}
    assert data["layer1.conv"]["retrain_data_config"]["fixed_min"] is True
    assert data["up"]["retrain_enable"] is False
    assert data["fc"]["retrain_weight_config"]["channel_wise"] is False
    config = retrain_config_from_dict(data, LAYERS)
    assert list(config.enabled_layers()) == ["conv1", "layer1.conv", "fc"]
    assert config.layers["layer1.conv"].single_op_config(2) == {
        "retrain_data_config": {"dst_type": "INT8", "batch_num": 2, "fixed_min": True,
                                "clip_min": None, "clip_max": None},
        "retrain_weight_config": {"dst_type": "INT8", "weights_retrain_algo": "arq_retrain",
                                  "channel_wise": True}}


def test_unknown_skip_layer_is_named():
    with pytest.raises(ConfigError, match="'pool'"):
        build_retrain_config(LAYERS, skip_layers=["pool"])


def test_the_seed_hand_tuned_json_loads(tmp_path):
    # The example of the seed's 手工调优 section, with its layer names replaced.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "version": 1, "batch_num": 1,
        "conv1": {"retrain_enable": True,
                  "retrain_data_config": {"algo": "ulq_quantize", "clip_max": 3.0,
                                          "clip_min": -3.0},
                  "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": True}},
        "fc": {"retrain_enable": False,
               "retrain_data_config": {"algo": "ulq_quantize"},
               "retrain_weight_config": {"algo": "arq_retrain", "channel_wise": False}}}))
    config = load_retrain_config(path, LAYERS)
    assert config.layers["conv1"].data.clip_max == 3.0
    assert config.layers["conv1"].data.clip_min == -3.0
    assert list(config.enabled_layers()) == ["conv1"]


@pytest.mark.parametrize("layer, entry, message", [
    ("conv1", {"retrain_enable": 1}, "layer 'conv1', key 'retrain_enable': must be true or false"),
    ("conv1", {"quant_enable": True}, "key 'quant_enable': is not a layer key"),
    ("conv1", {"retrain_data_config": {"algo": "ifmr"}}, "retrain_data_config.algo"),
    ("conv1", {"retrain_data_config": {"clip_max": 3.0}}, "retrain_data_config.clip_min"),
    ("conv1", {"retrain_data_config": {"clip_max": 3.0, "clip_min": 1.0}}, "must be < 0"),
    ("conv1", {"retrain_data_config": {"clip_max": 3.0, "clip_min": -1.0, "fixed_min": True}},
     "must be 0 when fixed_min"),
    ("conv1", {"retrain_data_config": {"dst_type": "INT4"}}, "INT4 is not supported"),
    ("conv1", {"retrain_weight_config": {"algo": "arq_quantize"}},
     "retrain_weight_config.algo"),
    ("fc", {"retrain_weight_config": {"channel_wise": True}}, "must be false for a linear"),
    ("pool", {"retrain_enable": True}, "key 'pool': is not a layer that quantization-aware"),
])
def test_bad_json_entries_name_layer_and_key(tmp_path, layer, entry, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"version": 1, "batch_num": 1, layer: entry}))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        load_retrain_config(path, LAYERS)
    assert str(path) in str(info.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(AmctFileNotFoundError, match="create_quant_retrain_config"):
        load_retrain_config(tmp_path / "none.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1,')
    with pytest.raises(ConfigError, match="line 1"):
        load_retrain_config(broken)
    with pytest.raises(ConfigError, match="batch_num"):
        retrain_config_from_dict({"batch_num": 0})


def test_write_refuses_an_invalid_config_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "config.json"
    write_retrain_config(path, build_retrain_config(LAYERS))
    before = path.read_bytes()
    with pytest.raises(ConfigError):
        write_retrain_config(path, {"version": 1, "conv1": {"retrain_enable": "yes"}})
    assert path.read_bytes() == before


CFG = """
batch_num: 3
quant_skip_layers: "conv1"
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: false } }
override_layer_types {
    layer_type: "ConvTranspose2d"
    retrain_weight_quant_config { ulq_retrain { channel_wise: true } }
}
override_layer_configs {
    layer_name: "layer1.conv"
    retrain_data_quant_config {
        ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: -2.0 } fixed_min: false }
    }
}
"""


def test_cfg_precedence(tmp_path):
    path = tmp_path / "retrain.cfg"
    path.write_text(CFG)
    data = build_retrain_config_from_cfg(LAYERS, path, after_relu=["layer1.conv", "fc"])
    assert data["batch_num"] == 3
    assert data["conv1"]["retrain_enable"] is False
    assert data["layer1.conv"]["retrain_data_config"] == {
        "algo": "ulq_quantize", "dst_type": "INT8", "clip_max": 6.0, "clip_min": -2.0}
    assert data["layer1.conv"]["retrain_weight_config"]["channel_wise"] is False
    assert data["up"]["retrain_weight_config"] == {"algo": "ulq_retrain", "channel_wise": True,
                                                   "dst_type": "INT8"}
    # fixed_min comes from the graph (after a ReLU) where the .cfg does not set it.
    assert data["fc"]["retrain_data_config"]["fixed_min"] is True


@pytest.mark.parametrize("text, message", [
    ("batch_num: 0", "batch_num must be >= 1"),
    ("skip_layers: 'nope'", "'nope'"),
    ("override_layer_types { layer_type: 'Conv3d' }", "'Conv3d'"),
    ("retrain_data_quant_config { ulq_quantize { dst_type: INT4 } }", "INT4 is not supported"),
    ("override_layer_configs { layer_name: 'fc' retrain_weight_quant_config "
     "{ arq_retrain { channel_wise: true } } }", "linear layer"),
    ("prune_config { }", "Pruning"),
    ("batch_num: 1\nbogus: 2", "line 2"),
])
def test_bad_cfg(tmp_path, text, message):
    path = tmp_path / "retrain.cfg"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_retrain_config_from_cfg(LAYERS, path)


def test_missing_cfg(tmp_path):
    with pytest.raises(AmctFileNotFoundError, match="config_defination"):
        build_retrain_config_from_cfg(LAYERS, tmp_path / "none.cfg")
