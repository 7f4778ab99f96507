"""The PTQ configs (reference §3.2): the JSON config and the simple .cfg."""
import copy
import json

import pytest

from amct_core.errors import AmctFileNotFoundError, AmctTypeError, AmctValueError, ConfigError
from amct_core.quant.config import (
    ActivationQuantParams,
    LayerQuantConfig,
    QuantConfig,
    WeightQuantParams,
    build_quant_config,
    build_quant_config_from_cfg,
    load_quant_config,
    quant_config_from_dict,
    write_quant_config,
)
from amct_core.quant.layers import QuantLayer

LAYERS = [QuantLayer("conv1", "Conv2d", "conv"),
          QuantLayer("deconv", "ConvTranspose2d", "conv_transpose"),
          QuantLayer("pool", "AvgPool2d", "avgpool"),
          QuantLayer("fc", "Linear", "linear")]

IFMR_DEFAULT = {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999,
                "search_range": [0.7, 1.3], "search_step": 0.01, "act_algo": "ifmr",
                "asymmetric": True}
ARQ_CHANNEL = {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": True}
ARQ_TENSOR = {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": False}

#: The IFMR example of the reference (§3.2, create_quant_config), with an fc layer.
REFERENCE_EXAMPLE = {
    "version": 1, "batch_num": 2, "activation_offset": True, "do_fusion": True,
    "skip_fusion_layers": [],
    "conv1": {"quant_enable": True, "dmq_balancer_param": 0.5,
              "activation_quant_params": {"num_bits": 8, "max_percentile": 0.999999,
                                          "min_percentile": 0.999999,
                                          "search_range": [0.7, 1.3], "search_step": 0.01,
                                          "act_algo": "ifmr", "asymmetric": False},
              "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize",
                                      "channel_wise": True}},
    "fc": {"quant_enable": True, "dmq_balancer_param": 0.5,
           "activation_quant_params": {"num_bits": 8, "max_percentile": 0.999999,
                                       "min_percentile": 0.999999, "search_range": [0.7, 1.3],
                                       "search_step": 0.01, "act_algo": "ifmr",
                                       "asymmetric": False},
           "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize",
                                   "channel_wise": False}},
}
#: The HFMG example of the reference.
REFERENCE_HFMG = {
    "version": 1, "batch_num": 2, "activation_offset": True, "do_fusion": True,
    "skip_fusion_layers": [],
    "conv1": {"quant_enable": True, "dmq_balancer_param": 0.5,
              "activation_quant_params": {"num_bits": 8, "act_algo": "hfmg",
                                          "num_of_bins": 4096, "asymmetric": False},
              "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize",
                                      "channel_wise": True}},
}


def write_json(path, data):
    path.write_text(json.dumps(data, indent=4))
    return path


# --- build_quant_config ---------------------------------------------------------------------

def test_default_config_is_the_reference_format():
    config = build_quant_config(LAYERS, skip_layers=["deconv"], batch_num=4)
    assert config == {
        "version": 1, "batch_num": 4, "activation_offset": True, "do_fusion": True,
        "skip_fusion_layers": [],
        "conv1": {"quant_enable": True, "activation_quant_params": IFMR_DEFAULT,
                  "weight_quant_params": ARQ_CHANNEL},
        "deconv": {"quant_enable": False, "activation_quant_params": IFMR_DEFAULT,
                   "weight_quant_params": ARQ_CHANNEL},
        "pool": {"quant_enable": True, "activation_quant_params": IFMR_DEFAULT},
        "fc": {"quant_enable": True, "activation_quant_params": IFMR_DEFAULT,
               "weight_quant_params": ARQ_TENSOR},
    }
    assert list(config) == ["version", "batch_num", "activation_offset", "do_fusion",
                            "skip_fusion_layers", "conv1", "deconv", "pool", "fc"]
    assert list(config["conv1"]["activation_quant_params"]) == list(IFMR_DEFAULT)


def test_activation_offset_sets_every_layer_asymmetric():
    config = build_quant_config(LAYERS, activation_offset=False)
    assert config["activation_offset"] is False
    assert all(config[layer.name]["activation_quant_params"]["asymmetric"] is False
               for layer in LAYERS)


def test_unknown_skip_layer_is_named():
    with pytest.raises(ConfigError) as caught:
        build_quant_config(LAYERS, skip_layers=["conv1", "conv9"])
    assert "'conv9'" in str(caught.value) and "skip_layers" in str(caught.value)
    assert "'conv1'" in str(caught.value).split("Quantizable layers:")[1]


@pytest.mark.parametrize("kwargs, error, expected", [
    ({"batch_num": 0}, AmctValueError, "Argument 'batch_num' must be an integer >= 1, got 0"),
    ({"batch_num": 1.5}, AmctTypeError, "Argument 'batch_num'"),
    ({"batch_num": True}, AmctTypeError, "Argument 'batch_num'"),
    ({"activation_offset": 1}, AmctTypeError, "Argument 'activation_offset' must be a bool"),
])
def test_bad_arguments_are_named(kwargs, error, expected):
    with pytest.raises(error, match=expected):
        build_quant_config(LAYERS, **kwargs)


def test_layer_names_must_be_unique_and_not_global_keys():
    with pytest.raises(ConfigError, match="'conv1' appears twice"):
        build_quant_config([LAYERS[0], LAYERS[0]])
    with pytest.raises(ConfigError, match="'batch_num' is also a top-level key"):
        build_quant_config([QuantLayer("batch_num", "Conv2d", "conv")])


# --- write / load ---------------------------------------------------------------------------

def test_write_then_load_round_trip(tmp_path):
    path = tmp_path / "sub" / "config.json"
    data = build_quant_config(LAYERS, skip_layers=["pool"], batch_num=3)
    assert write_quant_config(path, data) == str(path)
    text = path.read_text()
    assert text.startswith('{\n    "version": 1,\n    "batch_num": 3,')
    assert json.loads(text) == data
    config = load_quant_config(path, LAYERS)
    assert config.batch_num == 3 and config.activation_offset and config.do_fusion
    assert config.skip_fusion_layers == () and config.fakequant_precision_mode == "DEFAULT"
    assert list(config.layers) == ["conv1", "deconv", "pool", "fc"]
    assert list(config.enabled_layers()) == ["conv1", "deconv", "fc"]
    assert config.to_json() == data
    write_quant_config(tmp_path / "again.json", config)
    assert (tmp_path / "again.json").read_text() == text


def test_reference_example_loads_into_typed_fields(tmp_path):
    path = write_json(tmp_path / "config.json", REFERENCE_EXAMPLE)
    config = load_quant_config(path, LAYERS)
    conv1 = config.layers["conv1"]
    assert isinstance(conv1, LayerQuantConfig)
    assert conv1.activation_quant_params == ActivationQuantParams(
        act_algo="ifmr", num_bits=8, asymmetric=False, max_percentile=0.999999,
        min_percentile=0.999999, search_range=(0.7, 1.3), search_step=0.01)
    assert conv1.weight_quant_params == WeightQuantParams(8, True, "arq_quantize")
    assert conv1.weight is conv1.weight_quant_params
    assert conv1.activation is conv1.activation_quant_params
    assert conv1.dmq_balancer_param == 0.5
    assert config.layers["fc"].weight.channel_wise is False
    assert list(config.enabled_layers()) == ["conv1", "fc"]  # deleted layers are skipped
    assert config.dmq_enabled
    assert conv1.activation.calibrator_kwargs() == {
        "num_bits": 8, "symmetric": True, "max_percentile": 0.999999,
        "min_percentile": 0.999999, "search_range": (0.7, 1.3), "search_step": 0.01}
    assert config.to_json() == REFERENCE_EXAMPLE


def test_reference_hfmg_example_loads(tmp_path):
    config = load_quant_config(write_json(tmp_path / "c.json", REFERENCE_HFMG), LAYERS)
    activation = config.layers["conv1"].activation
    assert activation.act_algo == "hfmg" and activation.num_of_bins == 4096
    assert activation.calibrator_kwargs() == {"num_bits": 8, "symmetric": True,
                                              "num_of_bins": 4096}
    assert config.to_json() == REFERENCE_HFMG


def test_optional_keys_take_their_defaults(tmp_path):
    data = {"activation_offset": False,
            "conv1": {},
            "pool": {"activation_quant_params": {"num_bits": 16}},
            "fc": {"quant_enable": False,
                   "activation_quant_params": {"num_bits": 8, "act_algo": "hfmg"}}}
    config = load_quant_config(write_json(tmp_path / "c.json", data), LAYERS)
    assert config.batch_num == 1 and config.do_fusion and config.version == 1
    conv1 = config.layers["conv1"]
    assert conv1.quant_enable and conv1.activation == ActivationQuantParams(asymmetric=False)
    assert conv1.weight == WeightQuantParams(channel_wise=True)
    assert conv1.dmq_balancer_param is None
    assert config.layers["pool"].activation.num_bits == 16
    assert config.layers["pool"].weight is None
    assert config.layers["fc"].weight == WeightQuantParams(channel_wise=False)
    assert config.layers["fc"].activation.num_of_bins == 4096
    assert list(config.enabled_layers()) == ["conv1", "pool"]
    assert not config.dmq_enabled


def test_asymmetric_overrides_activation_offset(tmp_path):
    data = {"activation_offset": False,
            "conv1": {"activation_quant_params": {"num_bits": 8, "asymmetric": True}}}
    config = load_quant_config(write_json(tmp_path / "c.json", data))
    assert config.layers["conv1"].activation.asymmetric is True


def test_weight_bits_six_and_seven_on_conv_only(tmp_path):
    data = copy.deepcopy(REFERENCE_EXAMPLE)
    data["conv1"]["weight_quant_params"]["num_bits"] = 7
    config = load_quant_config(write_json(tmp_path / "c.json", data), LAYERS)
    assert config.layers["conv1"].weight.num_bits == 7


def test_without_layers_kinds_are_not_checked(tmp_path):
    data = {"anything": {"activation_quant_params": {"num_bits": 8}}}
    config = load_quant_config(write_json(tmp_path / "c.json", data))
    assert config.layers["anything"].weight is None


def mutate(path_keys, value):
    def apply(data):
        target = data
        for key in path_keys[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path_keys[-1]]
        else:
            target[path_keys[-1]] = value
    return apply


DELETE = object()
ACT = ("conv1", "activation_quant_params")
WTS = ("conv1", "weight_quant_params")

INVALID = [
    # (mutation, layer or None, key, words of the message)
    (mutate(("batchnum",), 2), None, "batchnum", "not a known top-level key"),
    (mutate(("conv9",), {"quant_enable": True}), None, "conv9",
     "not a quantizable layer of the model"),
    (mutate(("version",), 2), None, "version", "must be 1"),
    (mutate(("batch_num",), 0), None, "batch_num", "must be >= 1, got 0"),
    (mutate(("batch_num",), "2"), None, "batch_num", 'must be an integer, got "2"'),
    (mutate(("batch_num",), True), None, "batch_num", "must be an integer, got true"),
    (mutate(("activation_offset",), "true"), None, "activation_offset", "true or false"),
    (mutate(("do_fusion",), 1), None, "do_fusion", "true or false, got 1"),
    (mutate(("skip_fusion_layers",), "conv1"), None, "skip_fusion_layers", "list of layer"),
    (mutate(("skip_fusion_layers",), ["conv7"]), None, "skip_fusion_layers", "'conv7'"),
    (mutate(("fakequant_precision_mode",), "FP16"), None, "fakequant_precision_mode",
     "DEFAULT, FORCE_FP16_QUANT"),
    (mutate(("conv1", "quant_enabled"), True), "conv1", "quant_enabled", "not a layer key"),
    (mutate(("conv1", "quant_enable"), "yes"), "conv1", "quant_enable", 'got "yes"'),
    (mutate(("conv1", "dmq_balancer_param"), 0.9), "conv1", "dmq_balancer_param",
     "[0.2, 0.8], got 0.9"),
    (mutate(("conv1", "dmq_balancer_param"), "0.5"), "conv1", "dmq_balancer_param",
     "must be a number"),
    (mutate(ACT, [8]), "conv1", "activation_quant_params", "must be a JSON object"),
    (mutate((*ACT, "num_bits"), 4), "conv1", "activation_quant_params.num_bits",
     "must be 8 or 16, got 4"),
    (mutate((*ACT, "num_bits"), DELETE), "conv1", "activation_quant_params.num_bits",
     "is required"),
    (mutate((*ACT, "num_bits"), 8.0), "conv1", "activation_quant_params.num_bits",
     "must be an integer, got 8.0"),
    (mutate((*ACT, "act_algo"), "kl"), "conv1", "activation_quant_params.act_algo",
     "'ifmr' or 'hfmg'"),
    (mutate((*ACT, "max_percentile"), 0.5), "conv1", "activation_quant_params.max_percentile",
     "(0.5, 1], got 0.5"),
    (mutate((*ACT, "min_percentile"), 1.01), "conv1", "activation_quant_params.min_percentile",
     "(0.5, 1], got 1.01"),
    (mutate((*ACT, "search_range"), [1.3, 0.7]), "conv1", "activation_quant_params.search_range",
     "0 < start < end, got [1.3, 0.7]"),
    (mutate((*ACT, "search_range"), [0, 1.3]), "conv1", "activation_quant_params.search_range",
     "0 < start < end"),
    (mutate((*ACT, "search_range"), [0.7]), "conv1", "activation_quant_params.search_range",
     "list of two numbers"),
    (mutate((*ACT, "search_step"), 0), "conv1", "activation_quant_params.search_step",
     "(0, end - start] = (0, 0.6], got 0"),
    (mutate((*ACT, "search_step"), 0.7), "conv1", "activation_quant_params.search_step",
     "got 0.7"),
    (mutate((*ACT, "num_of_bins"), 4096), "conv1", "activation_quant_params.num_of_bins",
     "belongs to act_algo 'hfmg', but act_algo is 'ifmr'"),
    (mutate((*ACT, "clip_max"), 4), "conv1", "activation_quant_params.clip_max",
     "is not an activation parameter"),
    (mutate(WTS, {"num_bits": 8, "wts_algo": "ada_quantize"}), "conv1",
     "weight_quant_params.wts_algo", "must be 'arq_quantize'"),
    (mutate((*WTS, "num_bits"), 4), "conv1", "weight_quant_params.num_bits",
     "one of 6, 7, 8, got 4"),
    (mutate((*WTS, "num_bits"), DELETE), "conv1", "weight_quant_params.num_bits", "required"),
    (mutate((*WTS, "channel_wise"), "yes"), "conv1", "weight_quant_params.channel_wise",
     "true or false"),
    (mutate((*WTS, "symmetric"), True), "conv1", "weight_quant_params.symmetric",
     "not a weight parameter"),
    (mutate(("fc", "weight_quant_params", "channel_wise"), True), "fc",
     "weight_quant_params.channel_wise", "must be false for a linear layer"),
    (mutate(("fc", "weight_quant_params", "num_bits"), 7), "fc",
     "weight_quant_params.num_bits", "must be one of 8 (6 and 7 are for conv layers only)"),
    (mutate(("pool",), {"weight_quant_params": ARQ_TENSOR}), "pool", "weight_quant_params",
     "an avgpool layer has no weights"),
    (mutate(("pool",), {"dmq_balancer_param": 0.5}), "pool", "dmq_balancer_param",
     "avgpool layer"),
]


@pytest.mark.parametrize("change, layer, key, words", INVALID)
def test_invalid_config_names_file_layer_and_key(tmp_path, change, layer, key, words):
    data = copy.deepcopy(REFERENCE_EXAMPLE)
    data["pool"] = {"quant_enable": True, "activation_quant_params": dict(IFMR_DEFAULT)}
    change(data)
    path = write_json(tmp_path / "config.json", data)
    with pytest.raises(ConfigError) as caught:
        load_quant_config(path, LAYERS)
    text = str(caught.value)
    assert f"Quantization config '{path}'" in text
    if layer is None:
        assert f"key '{key}'" in text
    else:
        assert f"layer '{layer}', key '{key}'" in text
    assert words in text


def test_hfmg_layer_with_an_ifmr_key(tmp_path):
    data = copy.deepcopy(REFERENCE_HFMG)
    data["conv1"]["activation_quant_params"]["search_step"] = 0.01
    with pytest.raises(ConfigError, match="belongs to act_algo 'ifmr', but act_algo is 'hfmg'"):
        load_quant_config(write_json(tmp_path / "c.json", data), LAYERS)
    data["conv1"]["activation_quant_params"] = {"num_bits": 8, "act_algo": "hfmg",
                                                "num_of_bins": 1000}
    with pytest.raises(ConfigError, match="1024, 2048, 4096, 8192, got 1000"):
        load_quant_config(write_json(tmp_path / "c.json", data), LAYERS)


def test_missing_file(tmp_path):
    with pytest.raises(AmctFileNotFoundError, match="config.json' does not exist"):
        load_quant_config(tmp_path / "config.json")


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n    "batch_num": 1,\n    "conv1": {"quant_enable": true,}\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_quant_config(path)
    assert str(path) in str(caught.value) and "line 3, column 36" in str(caught.value)


def test_duplicate_layer_key_is_an_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"conv1": {"quant_enable": true}, "conv1": {"quant_enable": false}}')
    with pytest.raises(ConfigError, match="key 'conv1' appears twice"):
        load_quant_config(path)


def test_non_finite_numbers_are_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"conv1": {"dmq_balancer_param": NaN}}')
    with pytest.raises(ConfigError, match="NaN is not a valid value"):
        load_quant_config(path)


def test_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_quant_config(path)


def test_invalid_config_is_not_written_and_the_file_kept(tmp_path):
    path = tmp_path / "config.json"
    good = build_quant_config(LAYERS)
    write_quant_config(path, good)
    before = path.read_bytes()
    bad = copy.deepcopy(good)
    bad["conv1"]["activation_quant_params"]["search_step"] = -1
    with pytest.raises(ConfigError) as caught:
        write_quant_config(path, bad)
    assert str(path) in str(caught.value) and "'conv1'" in str(caught.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_in_memory_validation_names_its_source():
    with pytest.raises(ConfigError, match="Quantization config 'mine': key 'batch_num'"):
        quant_config_from_dict({"batch_num": -1}, source="mine")
    config = quant_config_from_dict(build_quant_config(LAYERS), LAYERS)
    assert isinstance(config, QuantConfig)


# --- the simple .cfg ------------------------------------------------------------------------

CFG_LAYERS = [QuantLayer("conv1", "Conv2d", "conv"), QuantLayer("conv2", "Conv2d", "conv"),
              QuantLayer("fc1", "Linear", "linear"), QuantLayer("fc2", "Linear", "linear"),
              QuantLayer("pool", "AvgPool2d", "avgpool")]

#: In the syntax of the reference's quant.cfg sample.
SAMPLE_CFG = """\
# global quantize parameter
batch_num : 2
activation_offset : true
skip_layers : "conv2"
skip_layer_types:"AvgPool2d"
do_fusion: true
skip_fusion_layers : "conv1"
common_config : {
    arq_quantize : {
        channel_wise : true
        quant_bits : 7
    }
    ifmr_quantize : {
        search_range_start : 0.7
        search_range_end : 1.3
        search_step : 0.01
        max_percentile : 0.999999
        min_percentile : 0.999999
        asymmetric : true
    }
     dmq_balancer : {
         migration_strength : 0.5
    }
}

override_layer_types : {
    layer_type : "Linear"
    calibration_config : {
        ifmr_quantize : {
            search_range_start : 0.8
            search_range_end : 1.2
            search_step : 0.02
            asymmetric : false
        }
        dmq_balancer : {
            migration_strength : 0.3
        }
    }
}

override_layer_configs : {
    layer_name : "fc2"
    calibration_config : {
        arq_quantize : {
            channel_wise : false
        }
        hfmg_quantize : {
            num_of_bins : 2048
            dst_type : INT16
        }
    }
}
"""


def write_cfg(tmp_path, text, name="quant.cfg"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sample_cfg_gives_the_expected_json(tmp_path):
    data = build_quant_config_from_cfg(CFG_LAYERS, write_cfg(tmp_path, SAMPLE_CFG))
    ifmr_common = dict(IFMR_DEFAULT)
    ifmr_linear = {"num_bits": 8, "max_percentile": 0.999999, "min_percentile": 0.999999,
                   "search_range": [0.8, 1.2], "search_step": 0.02, "act_algo": "ifmr",
                   "asymmetric": False}
    assert data == {
        "version": 1, "batch_num": 2, "activation_offset": True, "do_fusion": True,
        "skip_fusion_layers": ["conv1"],
        "conv1": {"quant_enable": True, "dmq_balancer_param": 0.5,
                  "activation_quant_params": ifmr_common,
                  "weight_quant_params": {"num_bits": 7, "wts_algo": "arq_quantize",
                                          "channel_wise": True}},
        "conv2": {"quant_enable": False, "dmq_balancer_param": 0.5,
                  "activation_quant_params": ifmr_common,
                  "weight_quant_params": {"num_bits": 7, "wts_algo": "arq_quantize",
                                          "channel_wise": True}},
        # common_config's INT7, channel-wise weights become 8-bit per-tensor on linear layers
        "fc1": {"quant_enable": True, "dmq_balancer_param": 0.3,
                "activation_quant_params": ifmr_linear,
                "weight_quant_params": ARQ_TENSOR},
        # asymmetric falls back to the type override (false), not to activation_offset
        "fc2": {"quant_enable": True, "dmq_balancer_param": 0.3,
                "activation_quant_params": {"num_bits": 16, "act_algo": "hfmg",
                                            "num_of_bins": 2048, "asymmetric": False},
                "weight_quant_params": ARQ_TENSOR},
        "pool": {"quant_enable": False, "activation_quant_params": ifmr_common},
    }
    # and it is a valid config file
    path = tmp_path / "config.json"
    write_quant_config(path, data)
    config = load_quant_config(path, CFG_LAYERS)
    assert list(config.enabled_layers()) == ["conv1", "fc1", "fc2"]


def test_empty_cfg_gives_the_default_config(tmp_path):
    path = write_cfg(tmp_path, "# nothing\n")
    assert build_quant_config_from_cfg(CFG_LAYERS, path) == build_quant_config(CFG_LAYERS)


def test_activation_offset_is_the_last_fallback_of_asymmetric(tmp_path):
    path = write_cfg(tmp_path, "activation_offset: false\n"
                               "common_config { hfmg_quantize { num_of_bins: 1024 } }\n")
    data = build_quant_config_from_cfg(CFG_LAYERS, path)
    assert data["activation_offset"] is False
    assert data["conv1"]["activation_quant_params"] == {
        "num_bits": 8, "act_algo": "hfmg", "num_of_bins": 1024, "asymmetric": False}


def test_fakequant_precision_mode_reaches_the_json(tmp_path):
    path = write_cfg(tmp_path, "fakequant_precision_mode: FORCE_FP16_QUANT\n")
    data = build_quant_config_from_cfg(CFG_LAYERS, path)
    assert data["fakequant_precision_mode"] == "FORCE_FP16_QUANT"
    assert list(data)[:6] == ["version", "batch_num", "activation_offset", "do_fusion",
                              "skip_fusion_layers", "fakequant_precision_mode"]
    json_path = tmp_path / "config.json"
    write_quant_config(json_path, data)
    assert load_quant_config(json_path, CFG_LAYERS).fakequant_precision_mode == \
        "FORCE_FP16_QUANT"


def test_last_algorithm_named_wins(tmp_path):
    # reference .cfg: two algorithms of one group -> the last one configured is used
    path = write_cfg(tmp_path, "common_config { ifmr_quantize { search_step: 0.02 }\n"
                               "                hfmg_quantize { num_of_bins: 8192 } }\n")
    data = build_quant_config_from_cfg(CFG_LAYERS, path)
    assert data["conv1"]["activation_quant_params"]["act_algo"] == "hfmg"
    assert data["conv1"]["activation_quant_params"]["num_of_bins"] == 8192


def test_type_override_and_conv_bits(tmp_path):
    path = write_cfg(tmp_path, 'override_layer_types { layer_type: "Conv2d" calibration_config '
                               '{ arq_quantize { quant_bits: 6 channel_wise: false } } }\n')
    data = build_quant_config_from_cfg(CFG_LAYERS, path)
    assert data["conv1"]["weight_quant_params"] == {"num_bits": 6, "wts_algo": "arq_quantize",
                                                    "channel_wise": False}
    assert data["fc1"]["weight_quant_params"] == ARQ_TENSOR


INVALID_CFG = [
    ('skip_layers: "conv9"', ["skip_layers", "'conv9'"]),
    ('skip_fusion_layers: "fc9"', ["skip_fusion_layers", "'fc9'"]),
    ('skip_layer_types: "Conv3d"', ["skip_layer_types", "'Conv3d'", "'AvgPool2d'"]),
    ('override_layer_configs { layer_name: "conv9" calibration_config {} }',
     ["override_layer_configs", "'conv9'"]),
    ('override_layer_types { layer_type: "Conv" calibration_config {} }',
     ["override_layer_types", "'Conv'"]),
    ('override_layer_configs { layer_name: "fc1" calibration_config {} }\n'
     'override_layer_configs { layer_name: "fc1" calibration_config {} }',
     ["'fc1' has two override_layer_configs"]),
    ('override_layer_types { layer_type: "Linear" calibration_config {} }\n'
     'override_layer_types { layer_type: "Linear" calibration_config {} }',
     ["'Linear' has two override_layer_types"]),
    ("batch_num: 0", ["batch_num must be >= 1"]),
    ("common_config { ada_quantize { num_iteration: 10 } }",
     ["common_config: ada_quantize (AdaRound) is not supported"]),
    ("common_config { arq_quantize { quant_bits: 4 } }",
     ["common_config: arq_quantize.quant_bits must be one of 6, 7, 8, got 4"]),
    ("common_config { ifmr_quantize { max_percentile: 0.4 } }",
     ["ifmr_quantize.max_percentile must be in (0.5, 1], got 0.4"]),
    ("common_config { ifmr_quantize { search_range_start: 1.3 search_range_end: 0.7 } }",
     ["0 < search_range_start < search_range_end"]),
    ("common_config { ifmr_quantize { search_step: 0.9 } }",
     ["ifmr_quantize.search_step must be in (0, search_range_end - search_range_start]"]),
    ("common_config { hfmg_quantize { num_of_bins: 100 } }",
     ["hfmg_quantize.num_of_bins must be one of 1024, 2048, 4096, 8192, got 100"]),
    ("common_config { dmq_balancer { migration_strength: 0.9 } }",
     ["dmq_balancer.migration_strength must be in [0.2, 0.8], got 0.9"]),
    ('override_layer_configs { layer_name: "fc1" calibration_config '
     '{ arq_quantize { channel_wise: true } } }',
     ["override_layer_configs 'fc1'", "set arq_quantize.channel_wise to false"]),
    ('override_layer_types { layer_type: "Linear" calibration_config '
     '{ arq_quantize { quant_bits: 7 channel_wise: false } } }',
     ["override_layer_types 'Linear'", "quant_bits 7 is for conv layers only", "'fc1'"]),
    ('override_layer_configs { layer_name: "pool" calibration_config '
     '{ arq_quantize { } } }',
     ["override_layer_configs 'pool'", "has no weights"]),
    ('override_layer_configs { layer_name: "pool" calibration_config '
     '{ dmq_balancer { } } }',
     ["override_layer_configs 'pool'", "Remove dmq_balancer"]),
]


@pytest.mark.parametrize("text, words", INVALID_CFG)
def test_invalid_cfg_is_named(tmp_path, text, words):
    path = write_cfg(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as caught:
        build_quant_config_from_cfg(CFG_LAYERS, path)
    message = str(caught.value)
    assert f"Simple config '{path}'" in message
    for word in words:
        assert word in message


def test_cfg_parse_error_names_line_and_column(tmp_path):
    path = write_cfg(tmp_path, "batch_num: 2\ncommon_config {\n  ifmr_quantize { steps: 1 }\n}\n")
    with pytest.raises(ConfigError) as caught:
        build_quant_config_from_cfg(CFG_LAYERS, path)
    message = str(caught.value)
    assert str(path) in message and "line 3, column 19" in message and "steps" in message


def test_cfg_wrong_value_type_is_a_parse_error(tmp_path):
    path = write_cfg(tmp_path, 'batch_num: "two"\n')
    with pytest.raises(ConfigError, match="line 1, column 12"):
        build_quant_config_from_cfg(CFG_LAYERS, path)


def test_missing_cfg(tmp_path):
    with pytest.raises(AmctFileNotFoundError, match="quant.cfg' does not exist"):
        build_quant_config_from_cfg(CFG_LAYERS, tmp_path / "quant.cfg")
