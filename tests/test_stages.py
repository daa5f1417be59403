"""Stage configurations for split learning: loading, the six rules, and the edges they imply."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from dflsplit.config import config_from_dict, load_config
from dflsplit.mappings.stages import (
    RULES,
    StageConfigError,
    StageMapping,
    client_to_uid,
    find_violations,
    import_deeplopito_env,
    list_stage_configs,
    load_stages,
    mapping_from_config,
    parse_task,
    uid_to_client,
    validate,
    write_config_yaml,
)
from dflsplit.cli_stages import model_partitions, stages_main

from stage_examples import ALL_LOCAL, EXAMPLE

REPO = Path(__file__).resolve().parents[1]
SPLIT_CONFIGS = REPO / "eval" / "configs" / "split"


# Two clients, P=3: each runs the other's partition 2; rows ordered so nothing waits forever.
SWAP2 = [
    ["1_1", "2_2", "1_3", "1_4", "2_5", "1_6"],
    ["2_1", "1_2", "2_3", "2_4", "1_5", "2_6"],
]
# Same tasks, but each client first waits on a task the other runs later in its row.
SWAP2_DEADLOCK = [
    ["2_2", "1_1", "1_3", "1_4", "2_5", "1_6"],
    ["1_2", "2_1", "2_3", "2_4", "1_5", "2_6"],
]


def violations_of(rows, **kw) -> list:
    """The violations StageMapping raises for `rows` (fails the test if it accepts them)."""
    with pytest.raises(StageConfigError) as info:
        StageMapping(rows, **kw)
    errors = info.value.errors
    assert errors, "a rule violation must be listed in .errors"
    for e in errors:
        assert f"rule {e.rule}: {RULES[e.rule]}" in str(info.value)
    return errors


def assert_reported(errors, rule: int, row: int, task: str, text: str = "") -> None:
    match = [e for e in errors if e.rule == rule and e.row == row and e.task == task]
    assert match, f"no rule {rule} violation at row {row} task {task}: {[str(e) for e in errors]}"
    msg = str(match[0])
    assert f"row {row}" in msg and repr(task) in msg and f"rule {rule}: {RULES[rule]}" in msg
    assert text in msg


def moved(rows, task: str, to_row: int, position: int | None = None):
    """`rows` with `task` taken out of its row and put into row `to_row` (1-based)."""
    out = copy.deepcopy(rows)
    for row in out:
        if task in row:
            row.remove(task)
    target = out[to_row - 1]
    target.insert(len(target) if position is None else position, task)
    return out


# --------------------------------------------------------------------------- the worked example


def test_worked_example_runner_matrix():
    m = StageMapping(EXAMPLE, partitions=4)
    assert (m.num_clients, m.P) == (5, 4)
    assert m.runners == {1: [1, 1, 2, 1], 2: [2, 2, 5, 2], 3: [3, 5, 4, 3], 4: [4, 4, 1, 4], 5: [5, 3, 3, 5]}
    assert m.runner(3, 2) == 5 and m.runner(4, 3) == 1
    assert m.client_of(1, 6) == 2  # backward of partition 3 beside its forward 1_3
    assert m.tasks(3) == [(3, 1), (5, 2), (5, 3), (3, 4), (3, 5), (5, 6), (5, 7), (3, 8)]


def test_worked_example_edges():
    m = StageMapping(EXAMPLE, partitions=4)
    act = m.activation_edges()
    assert act == {
        (1, 2): [(1, 2)], (1, 4): [(4, 3)], (2, 1): [(1, 3)], (2, 5): [(2, 2)],
        (3, 5): [(3, 1), (5, 3)], (4, 1): [(4, 2)], (4, 3): [(3, 3)], (5, 2): [(2, 3)],
        (5, 3): [(5, 1)], (5, 4): [(3, 2)],
    }
    grad = m.gradient_edges()
    assert grad == {(d, s): v for (s, d), v in act.items()}
    # owner 3: activations 3 -> 5 -> 4 -> 3, gradients 3 -> 4 -> 5 -> 3
    assert [e for e, v in act.items() if any(o == 3 for o, _ in v)] == [(3, 5), (4, 3), (5, 4)]
    assert (3, 1) in act[(3, 5)] and (3, 2) in act[(5, 4)] and (3, 3) in act[(4, 3)]
    assert (3, 3) in grad[(3, 4)] and (3, 2) in grad[(4, 5)] and (3, 1) in grad[(5, 3)]


def test_worked_example_peer_graph_and_replicas():
    m = StageMapping(EXAMPLE, partitions=4)
    assert m.peer_graph() == [(1, 2), (1, 4), (2, 5), (3, 4), (3, 5), (4, 5)]
    assert m.neighbors(5) == [2, 3, 4] and m.neighbors(1) == [2, 4]
    assert sorted(m.to_networkx().edges()) == m.peer_graph()
    assert m.hosted(1) == [(1, 1), (1, 2), (1, 4), (4, 3)]
    assert m.hosted(2) == [(1, 3), (2, 1), (2, 2), (2, 4)]
    assert m.hosted(3) == [(3, 1), (3, 4), (5, 2), (5, 3)]
    assert m.hosted(4) == [(3, 3), (4, 1), (4, 2), (4, 4)]
    assert m.hosted(5) == [(2, 3), (3, 2), (5, 1), (5, 4)]
    assert m.replicas(3) == {1: 2, 2: 5, 3: 4, 4: 1, 5: 3}
    assert m.replicas(1) == {o: o for o in range(1, 6)}


def test_stage_helpers_and_ids():
    m = StageMapping(EXAMPLE)
    assert [m.is_forward(s) for s in range(1, 9)] == [True] * 4 + [False] * 4
    assert [m.partition_of(s) for s in range(1, 9)] == [1, 2, 3, 4, 4, 3, 2, 1]
    assert [m.pair(s) for s in range(1, 9)] == [8, 7, 6, 5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="stage 9 is not in 1..8"):
        m.pair(9)
    with pytest.raises(ValueError, match="1-based"):
        m.hosted(0)
    assert client_to_uid(1) == 0 and uid_to_client(4) == 5
    assert parse_task("12_3") == (12, 3)


def test_all_local_has_no_edges():
    m = StageMapping(ALL_LOCAL, partitions=4)
    assert m.activation_edges() == {} and m.gradient_edges() == {} and m.peer_graph() == []
    assert m.neighbors(3) == []
    assert m.hosted(2) == [(2, 1), (2, 2), (2, 3), (2, 4)]
    assert "peer graph: no edges" in m.summary()


def test_summary_and_dot():
    m = StageMapping(EXAMPLE, partitions=4)
    text = m.summary()
    assert "5 clients, 4 partitions (8 stages)" in text
    assert "owner 3: 3 5 4 3" in text
    assert "peer graph: 1-2 1-4 2-5 3-4 3-5 4-5" in text
    assert "client 1: 1/1 1/2 1/4 4/3" in text
    dot = m.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert 'c3 -> c5 [style=solid, label="(3,1) (5,3)"]' in dot
    assert 'c5 -> c3 [style=dashed, label="(3,1) (5,3)"]' in dot
    assert dot.count("style=solid") == dot.count("style=dashed") == 10


# --------------------------------------------------------------------------- the rules


def test_backward_away_from_its_forward_is_rule_3():
    errors = violations_of(moved(EXAMPLE, "1_6", to_row=3))
    assert_reported(errors, 3, 3, "1_6", "client 2")
    assert {e.rule for e in errors} == {3}


def test_owner_first_or_last_partition_elsewhere_is_rule_4():
    first = moved(moved(EXAMPLE, "1_1", 2, 0), "1_8", 2)
    errors = violations_of(first)
    assert_reported(errors, 4, 2, "1_1", "expected the owner, client 1")
    assert_reported(errors, 4, 2, "1_8")
    last = moved(moved(EXAMPLE, "2_4", 5, 3), "2_5", 5, 4)
    errors = violations_of(last)
    assert_reported(errors, 4, 5, "2_4")
    assert_reported(errors, 4, 5, "2_5")
    assert {e.rule for e in errors} == {4}


def test_duplicate_and_missing_tasks_are_rule_2():
    dup = copy.deepcopy(EXAMPLE)
    dup[0].append("2_3")
    errors = violations_of(dup)
    assert_reported(errors, 2, 1, "2_3", "appears 2 times (rows 1, 5)")
    assert_reported(errors, 2, 5, "2_3", "appears 2 times (rows 1, 5)")
    assert [e.rule for e in errors] == [2, 2]
    missing = copy.deepcopy(EXAMPLE)
    missing[4].remove("3_7")
    errors = violations_of(missing)
    assert_reported(errors, 2, 5, "3_7", "in no row")
    assert [e.rule for e in errors] == [2]


def test_missing_row():
    errors = violations_of(EXAMPLE[:4])
    assert_reported(errors, 1, 3, "5_2", "is a row missing?")
    assert_reported(errors, 2, 2, "2_3", "in no row")
    assert {e.rule for e in errors} == {1, 2}


def test_stage_count_must_match_the_model():
    errors = violations_of(EXAMPLE, partitions=3)
    assert [e.rule for e in errors] == [5]
    assert_reported(errors, 5, 1, "1_8", "8 stages")
    assert "3 partitions" in str(errors[0])
    odd = [row[:-1] for row in ALL_LOCAL]  # 7 stages
    assert [e.rule for e in violations_of(odd)] == [5]


@pytest.mark.parametrize("label,row,text", [
    ("1-3", 1, "expected a string 'owner_stage'"),
    ("9_1", 1, "owner 9 is not in 1..5"),
    ("1_9", 1, "stage 9 is not in 1..8"),
])
def test_bad_labels_are_rule_1(label, row, text):
    rows = copy.deepcopy(EXAMPLE)
    rows[0][-1] = label  # replaces 1_8
    errors = violations_of(rows)
    assert_reported(errors, 1, row, label, text)
    assert_reported(errors, 2, 1, "1_8")  # the task it replaced is missing


def test_unquoted_yaml_label_gets_a_hint():
    rows = copy.deepcopy(ALL_LOCAL)
    rows[1][0] = 21  # YAML reads an unquoted 2_1 as 21
    assert_reported(violations_of(rows), 1, 2, "21", "quote the labels")
    with pytest.raises(StageConfigError, match="rule 1"):
        parse_task("0_1")


def test_deadlocking_row_orders_are_rule_6():
    StageMapping(SWAP2)  # the same tasks in a safe order
    errors = violations_of(SWAP2_DEADLOCK)
    assert [e.rule for e in errors] == [6]
    e = errors[0]
    assert e.row == 1 and e.task == "1_1"
    assert set(e.cycle) == {("1_1", 1), ("1_2", 2), ("2_1", 2), ("2_2", 1)}
    assert "1_1 (row 1) -> 1_2 (row 2) -> 2_1 (row 2) -> 2_2 (row 1) -> 1_1 (row 1)" in str(e)
    # a runtime that runs any ready task does not deadlock on it
    assert StageMapping(SWAP2_DEADLOCK, strict_order=False).runners == {1: [1, 2, 1], 2: [2, 1, 2]}


def test_deadlock_in_the_worked_example_variant():
    # client 4 starts with 4_4, which needs 4_3 on client 1, which needs 4_2 after 4_4 on client 4
    rows = moved(EXAMPLE, "4_4", 4, 0)
    errors = violations_of(rows)
    assert [e.rule for e in errors] == [6]
    assert {t for t, _ in errors[0].cycle} == {"4_1", "4_2", "4_3", "4_4"}


def test_every_violation_is_collected():
    rows = moved(EXAMPLE, "1_6", to_row=3)
    rows[4].remove("3_7")
    rows[1][0] = "2-1"
    with pytest.raises(StageConfigError) as info:
        validate(rows, partitions=4, source="cfg.py:7")
    msg = str(info.value)
    assert msg.startswith("cfg.py:7: invalid stage configuration (")
    assert {e.rule for e in info.value.errors} == {1, 2, 3}
    assert "'2-1'" in msg and "'3_7'" in msg and "'1_6'" in msg
    assert find_violations(EXAMPLE, 4) == []


def test_explicit_pairing():
    StageMapping(EXAMPLE, pairing={"1": "8", "2": "7", 3: 6, "4": "5"})
    errors = violations_of(EXAMPLE, pairing={"1": "7"})
    assert errors[0].rule == 3 and errors[0].where == "pairing"
    assert "stage 1 pairs with 8, not 7" in str(errors[0])


# --------------------------------------------------------------------------- loaders


def test_load_from_list_and_yaml_list(tmp_path):
    assert load_stages(EXAMPLE) == EXAMPLE
    assert load_stages([tuple(r) for r in EXAMPLE]) == EXAMPLE
    p = tmp_path / "stages.yaml"
    p.write_text("".join(f"- [{', '.join(repr(t) for t in row)}]\n" for row in EXAMPLE))
    assert load_stages(p) == EXAMPLE
    with pytest.raises(StageConfigError, match="row 2: expected a list of task labels"):
        load_stages([["1_1"], "2_1"])


def test_python_file_with_two_configs_and_index(tmp_path):
    p = tmp_path / "config_stages.py"
    p.write_text(
        "NUM_CLIENTS = 5\n"
        f"STAGES_CLIENTS = {EXAMPLE!r}\n"
        "OTHER = [['x']]\n"
        "# a local alternative\n"
        f"STAGES_CLIENTS: list = {ALL_LOCAL!r}\n"
    )
    assert list_stage_configs(p) == [EXAMPLE, ALL_LOCAL]
    assert load_stages(p) == EXAMPLE
    assert load_stages(p, index=1) == ALL_LOCAL
    assert load_stages(p, index=-1) == ALL_LOCAL
    with pytest.raises(StageConfigError, match=r"config_stages.py: .*index 2 is out of range: the file holds 2"):
        load_stages(p, index=2)
    assert StageMapping.from_file(p, index=1).peer_graph() == []
    assert StageMapping.from_file(p).source == f"{p}:2"


def test_python_file_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    p = tmp_path / "evil.py"
    p.write_text(
        "import os\n"
        f"os.system('touch {marker}')\n"
        f"open({str(marker)!r}, 'w').close()\n"
        f"STAGES_CLIENTS = {SWAP2!r}\n"
    )
    assert load_stages(p) == SWAP2
    assert not marker.exists()
    q = tmp_path / "computed.py"
    q.write_text(f"import os\n\nSTAGES_CLIENTS = os.system('touch {marker}')\n")
    with pytest.raises(StageConfigError, match=r"computed.py:3: STAGES_CLIENTS is not a literal"):
        load_stages(q)
    assert not marker.exists()


def test_env_file_lines(tmp_path):
    p = tmp_path / ".env"
    p.write_text(
        "# OPTIONS : RESNET18 , CNN\nCURRENT_MODEL=CNN\n\n"
        f"#STAGES_CLIENTS={SWAP2!r}\n"  # commented: not counted
        f"STAGES_CLIENTS={EXAMPLE!r}\n"
        "#local config\n"
        f"export STAGES_CLIENTS='{ALL_LOCAL!r}'\n"
        "SIMULATION_STAGES_CLIENTS=[\n"
        + "".join(f"  {row!r},\n" for row in SWAP2) + "]\n"
    )
    assert list_stage_configs(p) == [EXAMPLE, ALL_LOCAL, SWAP2]
    assert load_stages(p, index=2) == SWAP2
    with pytest.raises(StageConfigError, match=r"\.env: .*index 3 .*holds 3"):
        load_stages(p, index=3)
    bad = tmp_path / "bad.env"
    bad.write_text("STAGES_CLIENTS=[['1_1',\n")
    with pytest.raises(StageConfigError, match=r"bad.env:1: STAGES_CLIENTS: not a Python/JSON literal"):
        load_stages(bad)
    with pytest.raises(StageConfigError, match="no stage configuration found"):
        load_stages(_write(tmp_path / "empty.env", "BATCH_SIZE=3\n"))
    with pytest.raises(StageConfigError, match="not found"):
        load_stages(tmp_path / "absent.env")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_dflsplit_yaml_config_and_stages_file(tmp_path):
    (tmp_path / "stages.py").write_text(f"STAGES_CLIENTS = {ALL_LOCAL!r}\nSTAGES_CLIENTS = {EXAMPLE!r}\n")
    cfg_path = _write(tmp_path / "run.yaml",
                      "run: {procs_per_machine: 5}\nnode: {name: split}\n"
                      "split: {stages_file: stages.py, stages_index: 1}\n")
    cfg = load_config(cfg_path)
    m = mapping_from_config(cfg)
    assert m.runners[3] == [3, 5, 4, 3]
    assert load_stages(cfg_path) == EXAMPLE
    small = load_config(None, ["run.procs_per_machine=4", f"split.stages={ALL_LOCAL!r}"])
    with pytest.raises(StageConfigError, match="5 rows but the run has 4 nodes"):
        mapping_from_config(small)


def test_example_configs_load():
    for name in ("example5.yaml", "all_local5.yaml"):
        cfg = load_config(SPLIT_CONFIGS / name)
        assert cfg.node.name == "split" and cfg.model.name == "cnn" and cfg.num_nodes == 5
        assert cfg.split.sync == "fedavg" and cfg.split.sync_every == 1
        mapping_from_config(cfg, partitions=model_partitions("cnn"))
    assert load_config(SPLIT_CONFIGS / "example5.yaml").split.stages == EXAMPLE
    assert load_config(SPLIT_CONFIGS / "all_local5.yaml").split.stages == ALL_LOCAL
    assert load_stages(SPLIT_CONFIGS / "example5.py") == EXAMPLE
    assert list_stage_configs(SPLIT_CONFIGS / "example5.env") == [EXAMPLE]


# --------------------------------------------------------------------------- Deeplopito import


DEEPLOPITO_ENV = (
    "# OPTIONS : RESNET18  , CNN  , BERT\nCURRENT_MODEL=CNN\n"
    "# OPTIONS IS : CIFAR10 , MNIST\nCURRENT_DATASET=CIFAR-10\n\nBATCH_SIZE=16\n"
    "TRAINING_NUM_ROUNDS=3\nTRAINING_NUM_EPOCHS=2\nNUM_CLIENTS=5\nDATASET_N_SPLITS=5\n"
    f"STAGES_CLIENTS={EXAMPLE!r}\n#local config\nSTAGES_CLIENTS={ALL_LOCAL!r}\n"
)


def test_import_deeplopito_env(tmp_path):
    p = _write(tmp_path / ".env", DEEPLOPITO_ENV)
    data = import_deeplopito_env(p)
    cfg = config_from_dict(data, source="imported")
    assert (cfg.run.procs_per_machine, cfg.run.rounds) == (5, 3)
    assert (cfg.dataset.name, cfg.model.name, cfg.node.name) == ("cifar10", "cnn", "split")
    assert (cfg.training.batch_size, cfg.training.local_epochs, cfg.training.local_steps) == (16, 2.0, None)
    assert cfg.split.stages == EXAMPLE
    assert import_deeplopito_env(p, index=1)["split"]["stages"] == ALL_LOCAL
    out = tmp_path / "imported.yaml"
    write_config_yaml(data, out)
    again = load_config(out)
    assert again.split.stages == EXAMPLE and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("change,match", [
    (("CURRENT_MODEL=CNN", "CURRENT_MODEL=BERT"), r"\.env:2: CURRENT_MODEL: unknown name 'BERT'; known: .*cnn"),
    (("CURRENT_DATASET=CIFAR-10", "CURRENT_DATASET=IMDB"), r"unknown name 'IMDB'; known: .*mnist"),
    (("BATCH_SIZE=16\n", ""), r"\.env: missing key BATCH_SIZE"),
    (("NUM_CLIENTS=5", "NUM_CLIENTS=4"), r"5 rows but NUM_CLIENTS is 4"),
    (("TRAINING_NUM_ROUNDS=3", "TRAINING_NUM_ROUNDS=three"), r"TRAINING_NUM_ROUNDS: expected a positive integer"),
])
def test_import_deeplopito_env_errors(tmp_path, change, match):
    p = _write(tmp_path / ".env", DEEPLOPITO_ENV.replace(*change))
    with pytest.raises(StageConfigError, match=match):
        import_deeplopito_env(p)


# --------------------------------------------------------------------------- CLI


def test_cli_summary(tmp_path, capsys):
    p = _write(tmp_path / "stages.py", f"STAGES_CLIENTS = {EXAMPLE!r}\n")
    assert stages_main([str(p), "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "P=4 partitions" in out and "owner 3: 3 5 4 3" in out
    assert "peer graph: 1-2 1-4 2-5 3-4 3-5 4-5" in out
    assert stages_main([str(SPLIT_CONFIGS / "example5.yaml")]) == 0
    assert "checking against model 'cnn'" in capsys.readouterr().out


def test_cli_violations_exit_1(tmp_path, capsys):
    p = _write(tmp_path / "stages.py", f"STAGES_CLIENTS = {SWAP2_DEADLOCK!r}\nSTAGES_CLIENTS = {EXAMPLE!r}\n")
    assert stages_main([str(p), "--partitions", "3"]) == 1
    out = capsys.readouterr().out
    assert "holds 2 stage configurations" in out
    assert "row 1, task '1_1': rule 6: " + RULES[6] in out
    assert stages_main([str(p), "--index", "1", "--partitions", "3"]) == 1
    assert "rule 5: " + RULES[5] in capsys.readouterr().out
    assert stages_main([str(p), "--index", "1", "--partitions", "4"]) == 0
    assert stages_main([str(tmp_path / "absent.py"), "--partitions", "4"]) == 2
    assert "absent.py: stage configuration file not found" in capsys.readouterr().err


def test_cli_dot_and_import(tmp_path, capsys):
    env = _write(tmp_path / "run.env", DEEPLOPITO_ENV)
    dot, out_yaml = tmp_path / "g.dot", tmp_path / "run.yaml"
    assert stages_main([str(env), "--dot", str(dot), "--import-env", str(out_yaml)]) == 0
    assert "checking against model 'cnn'" in capsys.readouterr().out
    text = dot.read_text()
    assert text.startswith("digraph") and "c4 -> c3 [style=solid" in text and "c3 -> c4 [style=dashed" in text
    cfg = load_config(out_yaml)
    assert cfg.split.stages == EXAMPLE and cfg.run.procs_per_machine == 5
    # an invalid configuration is reported and not imported
    broken = _write(tmp_path / "broken.env", DEEPLOPITO_ENV.replace("'1_6', ", "", 1))
    assert stages_main([str(broken), "--import-env", str(tmp_path / "no.yaml")]) == 1
    assert not (tmp_path / "no.yaml").exists()


def test_model_partitions():
    assert model_partitions("cnn") == 4 and model_partitions("resnet18") == 10
    with pytest.raises(StageConfigError, match="model 'mlp' has no fixed partition count; give --partitions"):
        model_partitions("mlp")
