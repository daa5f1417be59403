"""The corpus of broken configs in tests/broken_configs/: each file is broken in exactly one
way and `dflsplit check-config` rejects it with one error that names the file, the section,
the key and, for an unknown key or name, the valid choices.

A file is named ``<kind>_<what>.yaml``, kind one of:

* ``key``: a key the chosen implementation (or the section) does not take;
* ``range``: a value outside its bounds, or impossible for this run;
* ``name``: an unknown implementation or registry name (or a value outside a fixed set);
* ``type``: a value of the wrong type.

Its first two lines say what the error must be::

    # expect: <regex the error message must match>
    # where: <section>.<key>

Every file is loaded in-process; the real CLI runs on one file of each kind (it imports
torch, ~3 s a run).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dflsplit.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "broken_configs"
FILES = sorted(CORPUS.glob("*.yaml"))
KINDS = ("key", "range", "name", "type")
#: how an error lists the valid choices: registry names, a section's keys, an
#: implementation's keys, a fixed set of values, or the one value that fits
CHOICES = re.compile(r"known: |valid keys: | takes |expected one of |\(use '")
#: the files the CLI itself is run on: one of each kind
CLI_FILES = ["key_optimizer_momentum_adam", "range_node_epidemic_peers_all", "name_sharing_top_k",
             "type_run_rounds_ten"]
PREFIX = "dflsplit check-config: error: "


def header(path: Path) -> tuple[str, str, str]:
    """(expect regex, section, key) from a corpus file's first two lines."""
    lines = path.read_text().splitlines()
    expect = re.fullmatch(r"# expect: (.+)", lines[0])
    where = re.fullmatch(r"# where: (\w+)\.(\w+)", lines[1])
    assert expect and where, f"{path.name}: the first lines must be '# expect: <regex>' and '# where: <section>.<key>'"
    return expect.group(1), where.group(1), where.group(2)


def kind_of(path: Path) -> str:
    return path.name.split("_", 1)[0]


def check_message(path: Path, shown: str, msg: str) -> None:
    """`msg`, the error for corpus file `path` (given to the loader as `shown`), is complete."""
    expect, section, key = header(path)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{shown}: section {section!r}: "), msg
    assert f"key {key!r}" in msg, msg
    if kind_of(path) in ("key", "name"):
        assert CHOICES.search(msg), f"no valid choices listed: {msg}"
    assert re.search(expect, msg), f"{msg!r} does not match {expect!r}"


def test_the_corpus_covers_every_kind():
    assert len(FILES) >= 20, [f.name for f in FILES]
    kinds = [kind_of(f) for f in FILES]
    assert set(kinds) == set(KINDS), sorted(set(kinds))
    assert all(kinds.count(k) >= 5 for k in KINDS), {k: kinds.count(k) for k in KINDS}
    assert len({header(f)[1] for f in FILES}) >= 8  # many sections
    assert all(CORPUS / f"{stem}.yaml" in FILES for stem in CLI_FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_rejected_with_one_complete_error(path):
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    check_message(path, str(path), str(e.value))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_broken_in_exactly_one_way(path):
    """Without the offending key the file is a valid config."""
    _, section, key = header(path)
    data = yaml.safe_load(path.read_text())
    del data[section][key]
    config_from_dict(data, str(path))


@pytest.mark.parametrize("stem", CLI_FILES)
def test_check_config_cli_prints_one_error_line(stem):
    path = CORPUS / f"{stem}.yaml"
    shown = str(path.relative_to(REPO))
    out = subprocess.run([sys.executable, "-m", "dflsplit.cli", "check-config", shown],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "" and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), out.stderr
    check_message(path, shown, lines[0][len(PREFIX):])
