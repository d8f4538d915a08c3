import re
from pathlib import Path

import pytest
import torch
import yaml

from finescope.config import Config, load_config, override, save_config, strip_provenance, to_dict, valid_keys
from finescope.errors import FinescopeError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  variant: global\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=0.01", "data.magnifications=[40,100]", "model.min_box_fraction=1/4"])
    assert cfg.model.variant == "global" and cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.data.magnifications == (40, 100)
    assert cfg.model.min_box_fraction == 0.25
    assert cfg.model.global_size == Config().model.global_size


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  varient: global\n")
    with pytest.raises(FinescopeError, match=r"unknown config key 'model.varient'.*model.variant"):
        load_config(path)
    with pytest.raises(FinescopeError, match="unknown config key 'train.epoch'"):
        load_config(None, ["train.epoch=3"])
    with pytest.raises(FinescopeError, match="config key 'train' is a section; set one of its keys: train.epochs, "):
        load_config(None, ["train=3"])  # not "unknown config key 'train'; valid: data, model, name, seed, train"


@pytest.mark.parametrize(
    "item, match",
    [
        ("train.epochs=many", "train.epochs"),
        ("data.source=s3", "data.source"),
        ("model.threshold=0", "model.threshold"),
        ("model.view_multiple=0", "'model.view_multiple' must be at least 1"),
        ("data.shape_pool=-1", "'data.shape_pool' must be >= 0"),
        ("train.epochs", "key=value"),
    ],
)
def test_bad_values(item, match):
    with pytest.raises(FinescopeError, match=match):
        load_config(None, [item])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FinescopeError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(FinescopeError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_round_trip_through_resolved_yaml(tmp_path):
    cfg = override(Config(), model={"variant": "attention"}, data={"magnifications": [100]})
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "finescope_version" in raw["_provenance"] and "git_commit" in raw["_provenance"]
    assert load_config(base=strip_provenance(raw)) == cfg
    assert to_dict(cfg)["data"]["magnifications"] == [100]


def test_valid_keys_cover_issue_keys():
    keys = set(valid_keys())
    for key in ("data.source", "data.root", "data.task", "data.magnifications", "data.group_pattern",
                "model.variant", "model.backbone", "model.weights", "model.pretrained", "model.global_size",
                "model.local_size", "model.num_crops", "train.epochs", "train.batch_size", "train.lr",
                "train.device", "seed"):
        assert key in keys


def test_shipped_configs_load():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in configs.glob("*.yaml"))
    assert {"demo.yaml", "breakhis_binary.yaml", "breakhis_subtype.yaml", "defungi.yaml"} <= set(names)
    for p in configs.glob("*.yaml"):
        load_config(p)


@pytest.mark.parametrize(("value", "expected"), [("true", "bf16"), ("false", "off"), ("fp16", "fp16"), ("bf16", "bf16")])
def test_amp_reads_precisions_and_old_booleans(value, expected):
    assert load_config(None, [f"train.amp={value}"]).train.amp == expected


@pytest.mark.parametrize(("value", "expected"), [("true", "default"), ("false", "off"), ("off", "off"),
                                               ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")])
def test_compile_reads_modes_and_old_booleans(value, expected):
    assert load_config(None, [f"train.compile={value}"]).train.compile == expected


def test_compile_rejects_other_modes():
    with pytest.raises(FinescopeError, match="train.compile.*off, default, reduce-overhead, max-autotune"):
        load_config(None, ["train.compile=fast"])


def test_amp_rejects_other_precisions():
    with pytest.raises(FinescopeError, match="train.amp.*bf16, fp16, off"):
        load_config(None, ["train.amp=fp8"])


def test_cpu_amp_is_off_by_default_and_offers_bf16_only():
    assert load_config(None).train.cpu_amp == "off"
    assert load_config(None, ["train.cpu_amp=bf16"]).train.cpu_amp == "bf16"
    assert load_config(None, ["train.cpu_amp=off"]).train.cpu_amp == "off"  # YAML reads off as false
    with pytest.raises(FinescopeError, match="train.cpu_amp.*off, bf16"):  # fp16 is 5-20x slower on a CPU
        load_config(None, ["train.cpu_amp=fp16"])


def test_cudnn_depthwise_setting_reaches_the_model_and_is_refused_under_compile():
    from finescope.models.backbones import DepthwiseConv2dWithoutCudnn
    from finescope.trainer import build_model

    assert load_config(None).train.cudnn_depthwise is True
    for value, count in (("true", 0), ("false", 17)):
        cfg = load_config(None, [f"train.cudnn_depthwise={value}", "model.backbone=mobilenet_v2"])
        model = build_model(cfg, 2, torch.device("cpu"))
        assert sum(type(m) is DepthwiseConv2dWithoutCudnn for m in model.modules()) == count
    with pytest.raises(FinescopeError, match="'train.cudnn_depthwise' .* 'train.compile' .*set train.compile=off"):
        load_config(None, ["train.cudnn_depthwise=false", "train.compile=reduce-overhead"])


def test_selection_graph_setting_reaches_the_model():
    from finescope.trainer import build_model

    assert load_config(None).train.selection_graph is True
    cfg = load_config(None, ["train.selection_graph=false", "model.backbone=tiny"])
    assert build_model(cfg, 2, torch.device("cpu")).selection_graph is False
    assert build_model(load_config(None, ["model.backbone=tiny"]), 2, torch.device("cpu")).selection_graph is True
    with pytest.raises(FinescopeError, match="train.selection_graph"):
        load_config(None, ["train.selection_graph=sometimes"])


def test_readme_config_table_lists_every_key_with_its_default():
    """README's "Config keys" table names every key of the dataclasses, with the default they hold."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Config keys", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)`", section, flags=re.M))
    assert sorted(table) == sorted(k for k in valid_keys() if "." in k)

    def parse(text: str):
        if text == '""':
            return ""
        if text in ("true", "false"):
            return text == "true"
        if text == "[]":
            return ()
        try:
            return float(text)
        except ValueError:
            return text

    defaults = Config()
    for key, text in table.items():
        section_name, name = key.split(".")
        want = getattr(getattr(defaults, section_name), name)
        got = parse(text)
        if isinstance(want, bool) or not isinstance(want, (int, float)):
            assert got == want, key
        else:
            assert abs(got - want) < 1e-3, key


def test_a_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 3\n  epochs: 5\n")
    with pytest.raises(FinescopeError, match="'epochs' appears twice"):
        load_config(path)


def test_a_shipped_config_is_found_by_name_outside_a_clone(tmp_path, monkeypatch):
    """A pip install has no configs/ folder, so `--config configs/breakhis_binary.yaml` named nothing there and the
    error sent the user to that folder. A bare name finds the config installed with the package; a file of that
    name in the working folder comes first; a miss lists the shipped names."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    for name in ("breakhis_binary", "breakhis_binary.yaml"):
        assert load_config(name) == load_config(root / "configs" / "breakhis_binary.yaml")
    (tmp_path / "demo.yaml").write_text("name: mine\n")
    assert load_config("demo").name != "mine" and load_config("demo.yaml").name == "mine"
    with pytest.raises(FinescopeError, match=r"config file 'configs/demo.yaml' not found; .* shipped config: "
                                             r"breakhis_binary, breakhis_protocol, breakhis_subtype, defungi, demo$"):
        load_config("configs/demo.yaml")


def test_data_bit_depth_takes_0_or_a_cameras_9_to_16_bits():
    """data.bit_depth (how 16-bit files are scaled: 0 by 65535, else by 2**bit_depth - 1) refuses other values in
    one line that lists the valid ones, before any image is read."""
    assert load_config().data.bit_depth == 0
    assert load_config(None, ["data.bit_depth=12"]).data.bit_depth == 12
    for bad in ("8", "17", "-1"):
        with pytest.raises(FinescopeError, match=r"^config key 'data.bit_depth' is -?\d+; choose 0 \(scale by the "
                                                 r"file's own type\) or the camera's bits in 16-bit files: 9, 10, "
                                                 r"11, 12, 13, 14, 15, 16$"):
            load_config(None, [f"data.bit_depth={bad}"])
