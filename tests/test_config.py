import pytest

from dflsplit.config import Config, ConfigError, dump_config, load_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_sections(tmp_path):
    p = write(tmp_path, "run:\n  rounds: 7\n  procs_per_machine: 4\ngraph:\n  type: ring\n")
    cfg = load_config(p)
    assert cfg.run.rounds == 7 and cfg.num_nodes == 4 and cfg.graph.type == "ring"
    assert cfg.dataset.name == "digits" and cfg.path == str(p)


def test_unknown_key_names_file_section_valid_keys_and_suggestion(tmp_path):
    p = write(tmp_path, "training:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'training'" in msg and "'batch_sise'" in msg
    assert "did you mean 'batch_size'" in msg and "local_steps" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'graphs' \(did you mean 'graph'\?\).*valid keys: run"):
        load_config(write(tmp_path, "graphs: {}\n"))


def test_wrong_type_names_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"section 'run': key 'rounds': expected int, got 'ten'"):
        load_config(write(tmp_path, "run:\n  rounds: ten\n"))
    with pytest.raises(ConfigError, match=r"key 'partition': expected one of 'iid', 'dirichlet'"):
        load_config(write(tmp_path, "dataset:\n  partition: random\n"))
    with pytest.raises(ConfigError, match=r"key 'lr': expected float"):
        load_config(write(tmp_path, "optimizer:\n  lr: [1]\n"))
    with pytest.raises(ConfigError, match=r"expected bool"):
        load_config(write(tmp_path, "run:\n  progress: 1\n"))


def test_int_is_accepted_as_float(tmp_path):
    assert load_config(write(tmp_path, "optimizer:\n  lr: 1\n")).optimizer.lr == 1.0


def test_cross_key_checks(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'local_steps' and 'local_epochs'"):
        load_config(write(tmp_path, "training:\n  local_epochs: 1\n"))
    cfg = load_config(write(tmp_path, "training:\n  local_epochs: 1\n  local_steps: null\n"))
    assert cfg.training.local_epochs == 1.0
    with pytest.raises(ConfigError, match="'rounds' must be > 0"):
        load_config(write(tmp_path, "run:\n  rounds: 0\n"))


def test_overrides_and_bad_override(tmp_path):
    cfg = load_config(None, ["run.rounds=3", "graph.type=ring", "dataset.image_shape=[1, 8, 8]", "dataset.name=synthetic"])
    assert cfg.run.rounds == 3 and cfg.graph.type == "ring" and cfg.dataset.image_shape == [1, 8, 8]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["rounds=3"])


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["run.rounds=3", "split.stages=[['1_1', '1_2']]"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again, Config)


def test_example_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("eval", "configs").rglob("*.yaml"))
    assert configs
    for p in configs:
        load_config(p)


def test_unset_removes_a_key_of_the_file(tmp_path):
    p = write(tmp_path, "sharing:\n  name: topk\n  alpha: 0.2\n")
    with pytest.raises(ConfigError, match="key 'alpha' is not taken by sharing 'full'"):
        load_config(p, ["sharing.name=full"])
    assert load_config(p, ["sharing.name=full"], unset=["sharing.alpha"]).sharing.name == "full"
    with pytest.raises(ConfigError, match="cannot unset 'sharing.levels'"):
        load_config(p, unset=["sharing.levels"])
