"""Tests of the typed configs: YAML round trip, conversion, unknown keys and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from masked_diffusion import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    ScheduleConfig,
    TrainerConfig,
    apply_overrides,
    load_config,
    save_config,
)


def test_config_round_trip(tmp_path: Path) -> None:
    config = ExperimentConfig(
        data=DataConfig(p_missing=0.25, batch_size=64),
        schedule=ScheduleConfig(kind="polynomial", num_timesteps=10, exponent=2.5),
        model=ModelConfig(channel_mults=(1, 2), num_groups=4, time_conditioning=False),
        trainer=TrainerConfig(lr=3e-4, betas=(0.8, 0.95), grad_clip=None, max_steps=7),
    )
    path = tmp_path / "nested" / "config.yaml"
    save_config(config, path)
    loaded = load_config(path)
    assert loaded == config
    assert loaded.model.channel_mults == (1, 2)
    assert loaded.trainer.betas == (0.8, 0.95)


def test_config_default_round_trip(tmp_path: Path) -> None:
    save_config(ExperimentConfig(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == ExperimentConfig()
    assert ExperimentConfig.from_dict(ExperimentConfig().to_dict()) == ExperimentConfig()


def test_config_scientific_float(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 3e-4\n  weight_decay: 1e-2\n", encoding="utf-8")
    config = load_config(path)
    assert config.trainer.lr == 3e-4
    assert isinstance(config.trainer.lr, float)
    assert config.trainer.weight_decay == 0.01


def test_config_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == ExperimentConfig()


def test_config_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  learning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown config key 'trainer.learning_rat'"):
        load_config(path)
    path.write_text("trainer:\n  epoch: 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"did you mean 'trainer.epochs'\?"):
        load_config(path)


def test_config_unknown_section() -> None:
    with pytest.raises(
        ValueError, match=r"unknown config key 'scheduel'; did you mean 'schedule'\?"
    ):
        ExperimentConfig.from_dict({"scheduel": {}})


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (
            {"data": {"p_missing": 1.0}},
            ValueError,
            r"invalid data.p_missing=1.0: expected a value in \[0, 1\)",
        ),
        (
            {"data": {"batch_size": -4}},
            ValueError,
            r"invalid data.batch_size=-4: expected a positive integer",
        ),
        ({"model": {"base_channels": 0}}, ValueError, r"invalid model.base_channels=0"),
        ({"model": {"image_size": [28, -1]}}, ValueError, r"invalid model.image_size=\(28, -1\)"),
        (
            {"trainer": {"epochs": "many"}},
            TypeError,
            r"invalid trainer.epochs='many': expected an integer",
        ),
        ({"trainer": {"lr": True}}, TypeError, r"invalid trainer.lr=True: expected a number"),
        (
            {"trainer": {"betas": [0.9]}},
            ValueError,
            r"invalid trainer.betas=\[0.9\]: expected a list of 2 values",
        ),
        ({"trainer": {"ema_decay": 1.0}}, ValueError, r"invalid trainer.ema_decay=1.0"),
        ({"diffusion": {"sampler": "firsthitting"}}, ValueError, r"did you mean 'first_hitting'\?"),
        ({"model": {"time_conditioning": "yes"}}, TypeError, r"expected true or false"),
        ({"trainer": 5}, TypeError, r"invalid trainer: expected a mapping"),
    ],
)
def test_config_invalid_values(
    data: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ExperimentConfig.from_dict(data)


def test_config_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    save_config(ExperimentConfig(), path)
    config = load_config(
        path,
        [
            "trainer.epochs=3",
            "trainer.lr=3e-4",
            "schedule.num_timesteps=null",
            "model.channel_mults=[1, 2]",
            "data.dataset=mnist",
        ],
    )
    assert config.trainer.epochs == 3
    assert config.trainer.lr == 3e-4
    assert config.schedule.num_timesteps is None
    assert config.model.channel_mults == (1, 2)
    assert config.data.dataset == "mnist"
    assert (
        apply_overrides(ExperimentConfig(), ["schedule.num_timesteps=4"]).schedule.num_timesteps
        == 4
    )


@pytest.mark.parametrize(
    "override", ["trainer.epochs", "epochs=3", "trainer.epochs.x=3", ".epochs=3"]
)
def test_config_malformed_override(override: str) -> None:
    with pytest.raises(
        ValueError, match=r"invalid override .*: expected section.key=value, e.g. trainer.epochs=5"
    ):
        apply_overrides(ExperimentConfig(), [override])


def test_config_override_unknown_key() -> None:
    with pytest.raises(
        ValueError, match=r"unknown config key 'trainer.epohs'; did you mean 'trainer.epochs'\?"
    ):
        apply_overrides(ExperimentConfig(), ["trainer.epohs=3"])


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")


def test_config_not_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected a mapping at the top level"):
        load_config(path)


def test_config_frozen() -> None:
    config = ExperimentConfig()
    with pytest.raises(AttributeError):
        config.trainer = TrainerConfig()  # type: ignore[misc]
    replaced = config.replace(trainer=TrainerConfig(epochs=2))
    assert replaced.trainer.epochs == 2
    assert config.trainer.epochs == 10
