"""The run's configuration as typed components, each setting documented once and the
command line and YAML generated from the fields; the rules that used to be hidden
(``--nce-k`` under ``--objective auto``, ``--launcher local`` with ``--bank``) are explicit,
and configs written by an older npid keep their meaning."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.config import (
    COMPONENTS,
    BankConfig,
    ConfigError,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
)
from trainer.config_fields import flag_of
from trainer.flags import HELP, build_parser, parse_config


def test_every_setting_is_one_documented_field_of_one_component():
    owners: dict[str, str] = {}
    for section, component in COMPONENTS:
        for f in dataclasses.fields(component):
            assert f.name not in owners, f"{f.name} in {owners.get(f.name)} and {section}"
            owners[f.name] = section
            if f.name != "extra":
                assert f.metadata["help"].strip(), f.name
    assert set(owners) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(HELP) == set(owners) - {"extra"}  # --help is generated, nothing written twice


def test_help_has_one_group_per_component_with_every_flag():
    parser = build_parser()
    groups = {
        g.title: [a.option_strings[0] for a in g._group_actions] for g in parser._action_groups
    }
    for _section, component in COMPONENTS:
        title = component.__doc__.split("\n")[0].rstrip(".")
        expected = [flag_of(f) for f in dataclasses.fields(component) if f.metadata.get("cli")]
        assert groups[title] == expected
    text = parser.format_help()
    assert "(default: 0.03)" in text and "4096 when not given" in text


def test_yaml_keys_flat_or_by_component(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  lr: 0.5\n  batch-size: 64\nobjective:\n  nce_t: 0.2\n")
    cfg = parse_config(["--config", str(nested), "--lr", "0.25"])  # the flag wins
    assert (cfg.lr, cfg.batch_size, cfg.nce_t) == (0.25, 64, 0.2)
    assert cfg.component("optim") == OptimConfig(lr=0.25, batch_size=64)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  nce_t: 0.2\n")
    with pytest.raises(ConfigError, match=r"unknown config key optim\.nce_t \(optim has: "):
        parse_config(["--config", str(bad)])
    zero = tmp_path / "zero.yaml"
    zero.write_text("optim:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match="--epochs must be >= 1"):
        parse_config(["--config", str(zero)])


def test_a_given_nce_k_means_nce_whatever_its_value():
    assert parse_config([]).objective_kind == "auto" and parse_config([]).resolved_nce_k == 4096
    assert parse_config(["--nce-k", "4096"]).objective_kind == "nce"  # the default K, given
    assert parse_config(["--nce-k", "100"]).objective_kind == "nce"
    assert parse_config(["--nce-k", "0"]).objective_kind == "softmax"
    assert parse_config(["--objective", "sampled-softmax", "--nce-k", "9"]).objective_kind == (
        "sampled-softmax"
    )
    assert ObjectiveConfig(nce_k=7).resolved_nce_k == 7


def test_launcher_and_bank_agree_or_say_why():
    assert parse_config(["--launcher", "local"]).resolved_bank == "local"
    assert parse_config([]).resolved_bank == "store"
    assert parse_config(["--bank", "local"]).resolved_bank == "local"
    with pytest.raises(ConfigError, match="--launcher local keeps the bank in process"):
        parse_config(["--launcher", "local", "--bank", "store"])
    with pytest.raises(ConfigError, match="--bank must be one of auto, store, local"):
        BankConfig(bank="remote")


def test_a_config_an_older_npid_saved_keeps_its_meaning():
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "config_version"}
    old.update(nce_k=4096, bank="store", launcher="local")  # how it wrote a default local run
    cfg = TrainConfig.from_dict(old)
    assert (cfg.objective_kind, cfg.resolved_nce_k, cfg.resolved_bank) == ("auto", 4096, "local")
    new = TrainConfig(nce_k=4096).to_dict()
    assert new["config_version"] == 2
    assert TrainConfig.from_dict(new).objective_kind == "nce"  # written now: given is given
    partial = {"nce_k": 4096}  # a YAML file is not a dump: taken as written
    assert TrainConfig.from_dict(partial).objective_kind == "nce"
