from pathlib import Path

import pytest

from sdray.config import apply_overrides, dump_yaml
from sdray.errors import ConfigError
from sdray.pipeline_config import CONFIG_DIR, load_pipeline_config


def test_packaged_configs_load():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "sd15"} <= set(names)
    for name in names:
        load_pipeline_config(name)
    assert load_pipeline_config("sd15").preprocess.resolution == 512


def test_dotted_override():
    cfg = load_pipeline_config("tiny", ["train.learning_rate=2e-4", "model.unet.layers_per_block=2"])
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.model.unet == {"layers_per_block": 2}


def test_unknown_key_names_key_and_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.lerning_rate'"):
        load_pipeline_config(str(path))


def test_unknown_section(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_pipeline_config(str(path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=abc", "train.batch_size: expected int, got str 'abc'"),
        ("train.batch_size=1.5", "train.batch_size: expected int"),
        ("train.use_gpu=1", "train.use_gpu: expected bool"),
        ("model.preset=sd21", "model.preset: must be one of"),
        ("synth.colors=[red,pink]", "pink"),
        ("preprocess.resolution=100", "multiple of 8"),
    ],
)
def test_wrong_type_or_value(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_pipeline_config("tiny", [override])


def test_a_choice_spelled_like_a_yaml_boolean_is_the_choice(tmp_path: Path):
    """YAML 1.1 reads an unquoted `no` as False; `mixed_precision: no` must still mean "no"."""
    cfg = load_pipeline_config("tiny", ["train.mixed_precision=no", "vae_train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no" and cfg.vae_train.mixed_precision == "no"
    path = tmp_path / "fp32.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_pipeline_config(str(path)).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision: must be one of .* got True"):
        load_pipeline_config("tiny", ["train.mixed_precision=yes"])


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.learning_rate"])


def test_missing_file():
    with pytest.raises(ConfigError, match="neither a file nor a packaged config"):
        load_pipeline_config("nope")


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_pipeline_config("tiny", ["train.max_steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_pipeline_config(str(path)) == cfg


def test_config_reference_is_current():
    from sdray.config_docs import DOC_PATH, field_docs, render

    assert DOC_PATH.read_text() == render(), "run: python -m sdray.config_docs > docs/config.md"
    from sdray.pipeline_config import PipelineConfig

    for section in PipelineConfig.__dataclass_fields__.values():
        cls = type(getattr(PipelineConfig(), section.name))
        missing = set(cls.__dataclass_fields__) - set(field_docs(cls))
        assert not missing, f"{section.name}: fields without a docstring: {missing}"


def test_model_path_wins_over_the_presets_sizes(tiny_model_dir):
    """The demo config sets size overrides; a model directory replaces them without extra flags, and only an
    explicit --set that disagrees with the directory is refused."""
    assert load_pipeline_config("demo").model.unet  # the demo preset's sizes
    cfg = load_pipeline_config("demo", [f"model.path={tiny_model_dir}"])
    assert (cfg.model.unet, cfg.model.vae, cfg.model.text_encoder, cfg.model.scheduler) == ({}, {}, {}, {})
    agrees = "model.scheduler.num_train_timesteps=1000"  # what tiny_model_dir holds: accepted
    assert load_pipeline_config("demo", [f"model.path={tiny_model_dir}", agrees]).model.scheduler == {}
    with pytest.raises(ConfigError, match=r"--set model\.unet\.block_out_channels=\[8, 8\] conflicts with "
                       r"model\.path .*block_out_channels: \[32, 64\].*drop the override"):  # fmt: skip
        load_pipeline_config("demo", [f"model.path={tiny_model_dir}", "model.unet.block_out_channels=[8, 8]"])
