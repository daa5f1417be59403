"""The generated references of README.rst: every key documented, the README up to date, the
check able to fail; README paths that exist; `dflsplit --version`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dflsplit import cli, reference
from dflsplit.config import registry_of
from dflsplit.registry import key

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"


def test_every_config_key_has_a_doc():
    assert reference.undocumented_keys() == []


def test_a_key_without_a_doc_is_refused():
    @dataclasses.dataclass
    class Keys:
        documented: int = key(1, "a doc")
        bare: int = 2

    fields = {f.name: f for f in dataclasses.fields(Keys)}
    assert "``documented`` (int, default ``1``): a doc" in reference.key_line(fields["documented"], int, "x.documented")
    with pytest.raises(reference.UndocumentedKey, match=r"x\.bare has no doc"):
        reference.key_line(fields["bare"], int, "x.bare")


def test_readme_references_are_up_to_date(capsys):
    assert cli.main(["reference", "--check", str(README)]) == 0, capsys.readouterr().out


@pytest.fixture
def temporary_training():
    """A training implementation registered for one test, with a key nobody documented in the README."""

    @dataclasses.dataclass
    class TmpKeys:
        zz_reference_probe: float = key(0.25, "a key added after the README was generated", gt=0)

    registry = registry_of("training")
    registry.register("zz_tmp_training", keys=TmpKeys)(object)
    try:
        yield "zz_tmp_training"
    finally:
        del registry._items["zz_tmp_training"], registry._keys["zz_tmp_training"]


def test_check_reports_a_new_key_and_write_fixes_it(temporary_training, tmp_path, capsys):
    copy = tmp_path / "README.rst"
    shutil.copy(README, copy)
    assert cli.main(["reference", "--check", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "configuration reference is out of date" in out
    assert re.search(r"^\+\* ``zz_reference_probe`` \(float, > 0, default ``0\.25``\)", out, re.M), out
    assert "command line reference" not in out  # only the block that differs is named

    assert cli.main(["reference", "--write", str(copy)]) == 0
    assert cli.main(["reference", "--check", str(copy)]) == 0
    text = copy.read_text()
    assert "With ``name: zz_tmp_training``:" in text
    outside = text.split(reference.begin_marker("CONFIG"))[0] + text.split(reference.end_marker("CONFIG"))[1]
    assert outside == (README.read_text().split(reference.begin_marker("CONFIG"))[0]
                       + README.read_text().split(reference.end_marker("CONFIG"))[1])  # the rest untouched


def test_check_reports_a_new_sub_command(tmp_path, capsys, monkeypatch):
    copy = tmp_path / "README.rst"
    shutil.copy(README, copy)
    build = cli.build_parser

    def with_extra_command():
        parser = build()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        extra = sub.add_parser("zz-probe", help="a command added after the README was generated")
        extra.add_argument("--zz-flag", help="its option")
        return parser

    monkeypatch.setattr(cli, "build_parser", with_extra_command)
    assert cli.main(["reference", "--check", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "command line reference is out of date" in out and "configuration reference" not in out
    assert "+``dflsplit zz-probe``" in out and "--zz-flag" in out


def test_missing_markers_are_an_error_naming_the_file(tmp_path, capsys):
    bare = tmp_path / "notes.rst"
    bare.write_text("Title\n=====\n\nno generated blocks here\n")
    assert cli.main(["reference", "--check", str(bare)]) == 2
    err = capsys.readouterr().err
    assert str(bare) in err and reference.begin_marker("CONFIG") in err


def test_cli_reference_covers_every_command_and_ignores_the_terminal_width(monkeypatch):
    text = reference.cli_reference()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert f"``dflsplit {name}``" in text
        assert f"usage: dflsplit {name}" in text
        for action in p._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, (name, option)
    monkeypatch.setenv("COLUMNS", "40")  # argparse would wrap differently; the reference must not
    assert reference.cli_reference() == text


def test_usage_shows_exclusive_groups_and_required_options():
    import argparse

    p = argparse.ArgumentParser(prog="demo")
    p.add_argument("file", metavar="FILE")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="NAME")
    g.add_argument("--partitions", metavar="P", type=int)
    p.add_argument("-n", "--nodes", required=True, type=int)
    p.add_argument("--many", nargs="+")
    assert reference.usage(p) == "usage: demo [--model NAME | --partitions P] -n NODES [--many MANY [MANY ...]] FILE"


def test_version_is_the_installed_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"dflsplit {importlib.metadata.version('dflsplit')}"


# ---------------------------------------------------------------- README.rst itself

#: what the README may name in double backquotes without it being in the repository: output
#: folders and placeholders (any name with <...> in it is a placeholder too)
NOT_IN_REPOSITORY = ("runs/", "keys/", "~/")
PLACEHOLDER_STEMS = ("OUT", "CONFIG", "RUN")
PATH_LIKE = re.compile(r"(/|\.(py|yaml|sh|ipynb|edges|adj|json|md)$)")


def readme_paths(text: str) -> list[str]:
    """Tokens of the README's ``double backquoted`` spans that look like repository paths."""
    out = []
    for span in re.findall(r"``(.+?)``", text, re.S):
        for token in span.split():
            token = token.strip("'\",;:()[]")
            if not PATH_LIKE.search(token) or "://" in token or token.startswith("/") or re.fullmatch(r"\.\w+", token):
                continue  # not a path: a URL, an absolute path, a bare suffix (.edges)
            if "<" in token or token.startswith(NOT_IN_REPOSITORY) or Path(token).stem in PLACEHOLDER_STEMS:
                continue
            out.append(token)
    return out


def repository_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout: every file under the root
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return listed.stdout.split()


def test_readme_names_only_paths_the_repository_has():
    files = repository_files()
    folders = {str(Path(f).parent) + "/" for f in files} | {
        "/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)}
    names = {Path(f).name for f in files}
    paths = readme_paths(README.read_text())
    assert "eval/configs/default.yaml" in paths and ".ci/run" in paths  # the scan finds paths at all
    missing = []
    for p in paths:
        if "/" in p:
            ok = p.rstrip("/") in files or p.rstrip("/") + "/" in folders
        else:
            ok = p in names
        if not ok:
            missing.append(p)
    assert missing == [], f"README.rst names paths the repository does not have: {missing}"


def test_the_path_scan_catches_a_missing_file():
    assert readme_paths("see ``DESIGN.md`` and ``eval/run.sh CONFIG`` or ``runs/x/``, ``OUT.yaml``, ``.adj``") == [
        "DESIGN.md", "eval/run.sh"]


def test_readme_quick_start_commands_are_the_ones_ci_runs():
    text = README.read_text()
    commands = re.findall(r"\.\. code-block:: bash\n\n   (.+)\n", text)
    assert len(commands) >= 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands[:2]:
        assert command in ci, f"{command!r} is not a line of .ci/run"
    first_section = text.index("\n---")
    assert text.index(commands[0]) < text.index("\n---", first_section + 1)  # at the top: in the first section


def test_readme_is_valid_restructuredtext():
    docutils_core = pytest.importorskip("docutils.core")
    import io

    errors = io.StringIO()
    docutils_core.publish_doctree(README.read_text(), settings_overrides={
        "warning_stream": errors, "report_level": 2, "halt_level": 5})
    assert errors.getvalue() == ""
