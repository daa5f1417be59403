"""The reference parts of README.rst, generated from the code so that they cannot drift.

* :func:`config_reference`: every config section, its common keys and the keys of each
  implementation its ``name`` can choose (and of the aggregation rules), each with type,
  bounds, default and one-line doc, read from the dataclasses in ``dflsplit.config`` and
  the registries.
* :func:`cli_reference`: every ``dflsplit`` sub-command's usage and options, read from
  ``dflsplit.cli.build_parser()``.

Each lives in the README between two comment lines (``.. BEGIN GENERATED CONFIG
REFERENCE`` / ``.. END GENERATED CONFIG REFERENCE``, likewise ``CLI``).
``dflsplit reference --write README.rst`` regenerates them in place;
``dflsplit reference --check README.rst`` exits 1 and shows what differs.

The CLI sits above every layer, and so does this module: it may import all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

#: name of a generated block → what it holds (the marker lines use the name)
BLOCKS = {"CONFIG": "configuration reference", "CLI": "command line reference"}
HEADING = "~"  # the README's sections use '-'; the generated headings sit one level below
WIDTH = 88  # width of the literal blocks of the CLI reference


def begin_marker(block: str) -> str:
    return f".. BEGIN GENERATED {block} REFERENCE"


def end_marker(block: str) -> str:
    return f".. END GENERATED {block} REFERENCE"


# ---------------------------------------------------------------- reStructuredText helpers

_LITERAL = re.compile(r"``.+?``")


def rst_escape(text: str) -> str:
    """`text` with the characters that would start inline markup escaped; spans already in
    double backquotes are kept, single-backquoted names become inline literals."""
    text = re.sub(r"(?<!`)`([^`\n]+)`(?!`)", r"``\1``", text)
    out, pos = [], 0
    for m in _LITERAL.finditer(text):
        out.append(_escape_plain(text[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_escape_plain(text[pos:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    text = text.replace("\\", "\\\\")
    text = re.sub(r"([*`|])", r"\\\1", text)
    return re.sub(r"_(?=\W|$)", r"\\_", text)  # `word_` would be a hyperlink reference


def literal(text: str) -> str:
    """`text` as an inline literal."""
    return f"``{text}``"


def heading(title: str, underline: str = HEADING) -> list[str]:
    return [title, underline * len(title), ""]


def yaml_value(value: Any) -> str:
    """A default as it is written in a YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        import yaml

        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return repr(value)


def _first_paragraph(doc: Optional[str]) -> str:
    if not doc:
        return ""
    return " ".join(textwrap.dedent(doc).strip().split("\n\n")[0].split())


# ---------------------------------------------------------------- configuration reference

class UndocumentedKey(ValueError):
    """A config key declared without a doc (give it one with ``registry.key(default, "doc")``)."""


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def key_line(f: dataclasses.Field, tp: Any, where: str, choices: Optional[Iterable[str]] = None) -> str:
    """One bullet: ``key`` (type, bounds, default): doc. `choices`: registry names the value picks
    from (shown instead of the type). Raises UndocumentedKey when the key has no doc."""
    from .config import _type_name
    from .registry import bounds_text

    doc = (f.metadata or {}).get("doc", "")
    if not doc:
        raise UndocumentedKey(f"config key {where} has no doc: declare it with key(default, \"one-line doc\") "
                              f"(dflsplit.registry.key)")
    if choices is None and typing.get_origin(tp) is typing.Literal:
        choices = [yaml_value(c) for c in typing.get_args(tp)]
    if choices is not None:
        kind = "one of " + ", ".join(literal(c) for c in choices)
    else:
        kind = rst_escape(_type_name(tp))
    parts = [kind]
    bounds = bounds_text(f)
    if bounds:
        parts.append(rst_escape(bounds))
    default = field_default(f)
    parts.append("required" if default is dataclasses.MISSING else f"default {literal(yaml_value(default))}")
    return f"* {literal(f.name)} ({', '.join(parts)}): {rst_escape(doc)}"


def _key_lines(cls: type, label: str, choices: dict[str, list[str]]) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [key_line(f, hints[f.name], f"{label}.{f.name}", choices.get(f.name))
            for f in dataclasses.fields(cls)]


def _common_choices(section: str) -> dict[str, list[str]]:
    """Keys of a section whose values are names from a registry, with those names."""
    from .config import IMPLEMENTATIONS, registry_of

    choices: dict[str, list[str]] = {}
    if section in IMPLEMENTATIONS:
        choices["name"] = registry_of(section).names()
    if section == "graph":
        from .graphs import GRAPH_TYPES, MIXING_WEIGHTS

        choices["type"], choices["mixing"] = GRAPH_TYPES.names(), MIXING_WEIGHTS.names()
    return choices


def section_reference(section: str) -> list[str]:
    """The lines of one section: its doc, common keys, and each implementation's keys."""
    from .config import IMPLEMENTATIONS, SECTIONS, registry_of

    cls = SECTIONS[section]
    lines = heading(literal(section))
    doc = _first_paragraph(cls.__doc__)
    if doc:
        lines += [rst_escape(doc), ""]
    if section not in IMPLEMENTATIONS:
        return lines + _key_lines(cls, section, _common_choices(section)) + [""]
    lines += ["Common keys:", ""] + _key_lines(cls, section, _common_choices(section)) + [""]
    registry = registry_of(section)
    keyless = []
    for name in registry.names():
        keys = registry.keys_of(name)
        if keys is None or not dataclasses.fields(keys):
            keyless.append(name)
            continue
        lines += [f"With {literal(f'name: {name}')}:", ""]
        lines += _key_lines(keys, f"{section}.{name}", {}) + [""]
    if keyless:
        lines += ["No keys of their own: " + ", ".join(literal(n) for n in keyless) + ".", ""]
    if section == "sharing":
        lines += aggregation_reference()
    return lines


def aggregation_reference() -> list[str]:
    """The rules ``sharing.aggregator`` names and the keys they take (keys of ``sharing``)."""
    from .sharing.aggregators import AGGREGATORS, PRE_AGGREGATORS

    lines = [
        f"{literal('aggregator')} names an aggregator ("
        + ", ".join(literal(n) for n in AGGREGATORS.names())
        + "), or a list of pre-aggregators ("
        + ", ".join(literal(n) for n in PRE_AGGREGATORS.names())
        + ") ending in one. The keys of the chosen rules are keys of the "
        + literal("sharing") + " section:",
        "",
    ]
    # one bullet per distinct key declaration, naming the rules that share it
    takers: dict[tuple, list[str]] = {}
    declared: dict[tuple, tuple[dataclasses.Field, Any]] = {}
    for registry in (PRE_AGGREGATORS, AGGREGATORS):
        for name in registry.names():
            keys = registry.keys_of(name)
            if keys is None:
                continue
            hints = typing.get_type_hints(keys)
            for f in dataclasses.fields(keys):
                ident = (f.name, repr(field_default(f)), (f.metadata or {}).get("doc", ""),
                         repr((f.metadata or {}).get("bounds")), repr(hints[f.name]))
                takers.setdefault(ident, []).append(name)
                declared[ident] = (f, hints[f.name])
    for ident in sorted(takers, key=lambda i: (i[0], takers[i])):
        f, tp = declared[ident]
        rules = takers[ident]
        line = key_line(f, tp, f"sharing.{f.name} ({', '.join(rules)})")
        lines.append(f"{line} [{', '.join(literal(r) for r in rules)}]")
    return lines + [""]


def config_reference() -> str:
    """The configuration reference as reStructuredText (every section of ``dflsplit.config``)."""
    from .config import SECTIONS

    lines = [
        "Generated from the code by " + literal("dflsplit reference --write README.rst") + "; each key reads "
        "(type, bounds, default): doc. A section's " + literal("name") + " chooses an implementation, "
        "which may take keys of its own beside the section's common keys.",
        "",
    ]
    for section in SECTIONS:
        lines += section_reference(section)
    return "\n".join(lines).rstrip() + "\n"


def undocumented_keys() -> list[str]:
    """Every config key (common, implementation or aggregation rule) that has no doc."""
    from .config import IMPLEMENTATIONS, SECTIONS, registry_of
    from .sharing.aggregators import AGGREGATORS, PRE_AGGREGATORS

    classes: list[tuple[str, type]] = [(name, cls) for name, cls in SECTIONS.items()]
    for section in IMPLEMENTATIONS:
        registry = registry_of(section)
        classes += [(f"{section} {name!r}", registry.keys_of(name)) for name in registry.names()]
    for registry in (AGGREGATORS, PRE_AGGREGATORS):
        classes += [(f"{registry.kind} {name!r}", registry.keys_of(name)) for name in registry.names()]
    return [f"{label}: {f.name}" for label, cls in classes if cls is not None
            for f in dataclasses.fields(cls) if not (f.metadata or {}).get("doc")]


# ---------------------------------------------------------------- command line reference

def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest if not action.option_strings else action.dest.upper()


def _args(action: argparse.Action) -> str:
    """The argument part of an action as usage writes it ('' for a flag)."""
    if action.nargs == 0:
        return ""
    m = _metavar(action)
    if isinstance(action, argparse._SubParsersAction):
        return f"{m} ..."
    nargs = action.nargs
    if nargs is None:
        return m
    if nargs == "?":
        return f"[{m}]"
    if nargs == "*":
        return f"[{m} ...]"
    if nargs == "+":
        return f"{m} [{m} ...]"
    if nargs == argparse.REMAINDER:
        return "..."
    return " ".join([m] * int(nargs))


def _shown(action: argparse.Action) -> bool:
    return action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)


def usage(parser: argparse.ArgumentParser) -> str:
    """The usage line of `parser`, wrapped at WIDTH (built here, the same on every Python)."""
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    parts: list[str] = []
    done: set[int] = set()
    for action in [a for a in parser._actions if a.option_strings] + [a for a in parser._actions
                                                                      if not a.option_strings]:
        if not _shown(action) or id(action) in done:
            continue
        group = groups.get(id(action))
        members = [a for a in group._group_actions if _shown(a)] if group is not None else [action]
        done.update(id(a) for a in members)
        items = [" ".join(x for x in (a.option_strings[0] if a.option_strings else "", _args(a)) if x)
                 for a in members]
        text = " | ".join(items)
        if group is not None and len(members) > 1:
            text = f"({text})" if group.required else f"[{text}]"
        elif action.option_strings and not action.required:
            text = f"[{text}]"
        parts.append(text)
    head = f"usage: {parser.prog}"
    lines, line = [], head
    for part in parts:
        if len(line) + 1 + len(part) > WIDTH and line != head and not line.isspace():
            lines.append(line)
            line = " " * len(head)
        line += " " + part
    return "\n".join(lines + [line])


def _help_text(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        if params.get("choices") is not None:
            params["choices"] = ", ".join(str(c) for c in params["choices"])
        text = text % params
    return " ".join(text.split())


def _invocation(action: argparse.Action) -> str:
    args = _args(action)
    if not action.option_strings:
        return args
    return ", ".join(action.option_strings) + (f" {args}" if args else "")


def _raw(parser: argparse.ArgumentParser) -> bool:
    return isinstance(parser.formatter_class, type) and issubclass(
        parser.formatter_class, argparse.RawDescriptionHelpFormatter)


def _paragraphs(text: Optional[str], raw: bool, prog: str) -> list[str]:
    if not text:
        return []
    if "%(prog)" in text:  # as argparse does
        text = text % {"prog": prog}
    if raw:
        return textwrap.dedent(text).strip("\n").splitlines() + [""]
    out = []
    for para in textwrap.dedent(text).strip().split("\n\n"):
        out += textwrap.wrap(" ".join(para.split()), WIDTH) + [""]
    return out


def command_help(parser: argparse.ArgumentParser) -> str:
    """`parser`'s help as ``--help`` prints it, formatted here so that it does not depend on
    the terminal width or the Python version."""
    lines = [usage(parser), ""]
    lines += _paragraphs(parser.description, _raw(parser), parser.prog)
    positionals = [a for a in parser._actions if not a.option_strings and _shown(a)]
    optionals = [a for a in parser._actions if a.option_strings and _shown(a)]
    for title, actions in (("positional arguments:", positionals), ("options:", optionals)):
        if not actions:
            continue
        lines.append(title)
        for a in actions:
            inv, text = "  " + _invocation(a), _help_text(a, parser.prog)
            if isinstance(a, argparse._SubParsersAction):
                text = text or "one of:"
            wrapped = textwrap.wrap(text, WIDTH - 24) if text else []
            if len(inv) <= 22 and wrapped:
                lines.append(f"{inv:<24}{wrapped[0]}")
                wrapped = wrapped[1:]
            else:
                lines.append(inv)
            lines += [" " * 24 + w for w in wrapped]
            if isinstance(a, argparse._SubParsersAction):
                for choice in a._choices_actions:
                    lines.append(f"    {choice.dest:<20} {choice.help or ''}".rstrip())
        lines.append("")
    lines += _paragraphs(parser.epilog, _raw(parser), parser.prog)
    return "\n".join(lines).rstrip() + "\n"


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every sub-command parser under it, depth first, in definition order."""
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():  # aliases map to the same parser
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out += _commands(sub)
    return out


def cli_reference(parser: Optional[argparse.ArgumentParser] = None) -> str:
    """The command line reference as reStructuredText: each command's help in a literal block."""
    if parser is None:
        from .cli import build_parser

        parser = build_parser()
    lines = ["Generated from the code by " + literal("dflsplit reference --write README.rst")
             + "; " + literal("dflsplit COMMAND --help") + " prints the same.", ""]
    for command in _commands(parser):
        lines += heading(literal(command.prog)) + ["::", ""]
        lines += [("   " + line).rstrip() for line in command_help(command).splitlines()] + [""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- README blocks

GENERATORS: dict[str, Callable[[], str]] = {"CONFIG": config_reference, "CLI": cli_reference}


def generated_blocks() -> dict[str, str]:
    """Block name → its generated text."""
    return {name: make() for name, make in GENERATORS.items()}


def _span(lines: list[str], block: str, source: str) -> tuple[int, int]:
    """Line indices of the begin and end markers of `block` in `lines`."""
    begin, end = begin_marker(block), end_marker(block)
    starts = [i for i, line in enumerate(lines) if line.rstrip() == begin]
    ends = [i for i, line in enumerate(lines) if line.rstrip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{source}: expected one line {begin!r} followed later by one line {end!r} "
                         f"(found {len(starts)} and {len(ends)}); the {BLOCKS[block]} goes between them")
    return starts[0], ends[0]


def block_text(text: str) -> str:
    """What goes between the markers: the generated text between blank lines."""
    return "\n" + text.rstrip("\n") + "\n\n"


def replace_blocks(document: str, blocks: dict[str, str], source: str = "<document>") -> str:
    """`document` with the text between each block's markers replaced by `blocks[name]`."""
    lines = document.splitlines(keepends=True)
    for name, text in blocks.items():
        start, end = _span([line.rstrip("\n") for line in lines], name, source)
        lines[start + 1:end] = block_text(text).splitlines(keepends=True)
    return "".join(lines)


def differences(document: str, blocks: dict[str, str], source: str = "<document>") -> dict[str, list[str]]:
    """Block name → the lines of a unified diff of `document`'s block against `blocks[name]`
    (only blocks that differ)."""
    lines = document.splitlines()
    out = {}
    for name, text in blocks.items():
        start, end = _span(lines, name, source)
        have = lines[start + 1:end]
        want = block_text(text).splitlines()
        if have != want:
            out[name] = list(difflib.unified_diff(have, want, f"{source} ({BLOCKS[name]})", "generated",
                                                  n=1, lineterm=""))
    return out


def check_file(path: str | Path) -> list[str]:
    """The problems of `path`'s generated blocks ([] when both are up to date): for each block
    that differs, a line naming it, then the diff (+ lines are what the code now generates)."""
    path = Path(path)
    diffs = differences(path.read_text(encoding="utf-8"), generated_blocks(), str(path))
    out = []
    for name, diff in diffs.items():
        out.append(f"{path}: the {BLOCKS[name]} is out of date; regenerate it with: "
                   f"dflsplit reference --write {path}")
        out += diff
    return out


def write_file(path: str | Path) -> bool:
    """Regenerate `path`'s blocks in place; True when the file changed."""
    path = Path(path)
    old = path.read_text(encoding="utf-8")
    new = replace_blocks(old, generated_blocks(), str(path))
    if new != old:
        path.write_text(new, encoding="utf-8")
    return new != old


# ---------------------------------------------------------------- `dflsplit reference`

def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``dflsplit reference`` on the sub-parsers action `sub`."""
    p = sub.add_parser(
        "reference", help="print, write or check the generated references of README.rst",
        description="Generate the configuration reference (every section and key, from the code) and "
        "the command line reference (every command's usage and options). Without options, print both.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--write", metavar="FILE", help="replace the generated blocks of FILE (e.g. README.rst)")
    which.add_argument("--check", metavar="FILE",
                       help="exit 1 and show the differences when FILE's generated blocks are out of date")
    p.set_defaults(func=run_reference)
    return p


def run_reference(args: argparse.Namespace) -> int:
    if args.check:
        problems = check_file(args.check)
        print("\n".join(problems) if problems else f"{args.check}: the generated references are up to date")
        return 1 if problems else 0
    if args.write:
        changed = write_file(args.write)
        print(f"{args.write}: {'regenerated' if changed else 'already up to date'}")
        return 0
    for name, text in generated_blocks().items():
        print(f"{begin_marker(name)}\n{block_text(text)}{end_marker(name)}")
    return 0
