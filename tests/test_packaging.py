"""The files the Debian package is made of that need no root: fetchd(1) and the shipped config.

tests/test_deb.py builds and installs the package itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import ModuleType

import pytest

from fetchd import cli
from fetchd.config import Config

ROOT = Path(__file__).resolve().parent.parent
# The tables of Config whose every setting systemd/config.toml shows: each of its fields whose
# default is a table of settings ([store], [server], [network], [pack], [fleet], and new ones).
TABLES = tuple(f.name for f in fields(Config) if is_dataclass(f.default))


def _manpage_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetchd_manpage", ROOT / "scripts" / "manpage.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _all_actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += [(name, a) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        elif not isinstance(action, argparse._HelpAction):
            out.append(("", action))
    return out


def test_manpage_has_every_command_option_and_help_of_the_parser() -> None:
    page = _manpage_module().render(date="2026-01-01")
    plain = page.replace("\\-", "-").replace("\\e", "\\")
    assert page.startswith('.TH FETCHD 1 "2026-01-01" "fetchd ')
    parser = cli._parser()
    for command, action in _all_actions(parser):
        if command:
            assert f".SS {command}\n" in plain, command
        for option in action.option_strings:
            assert f"\\fB{option}\\fR" in plain, (command, option)
        if action.help:
            assert action.help in plain, (command, action.help)
        if action.metavar and not action.option_strings:
            assert f"\\fI{action.metavar}\\fR" in plain, (command, action.metavar)
    for code in (cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_UNREACHABLE, cli.EXIT_INTERRUPTED):
        assert f".TP\n\\fB{code}\\fR\n" in page
    # No text line may start with a control character (it would be read as a request).
    body = [line for line in page.splitlines() if not line.startswith(".")]
    assert not [line for line in body if line.startswith("'")]


def test_manpage_escapes_what_roff_would_read_as_requests() -> None:
    module = _manpage_module()
    parser = argparse.ArgumentParser(prog="x", description="A tool: it does things.")
    parser.add_argument("--path", help=".starts with a dot and has a back\\slash")
    page = module.render(parser, date="2026-01-01")
    assert "\\&.starts with a dot and has a back\\eslash" in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
def test_manpage_renders_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "fetchd.1"
    path.write_text(_manpage_module().render())
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_shipped_config_is_only_comments_and_shows_the_defaults(tmp_path: Path) -> None:
    """systemd/config.toml (the package's /etc/fetchd/config.toml) loads as the defaults, and
    uncommenting every shown setting of [store], [server], [network] and [fleet] changes nothing but the
    examples of keys unset by default: the documented defaults are the code's."""
    text = (ROOT / "systemd" / "config.toml").read_text()
    assert all(not line.strip() or line.startswith("#") for line in text.splitlines())
    defaults = Config.from_dict({}, env={})
    shipped = tmp_path / "config.toml"
    shipped.write_text(text)
    assert Config.load(str(shipped), env={}).store == defaults.store

    uncommented = []
    table = None
    for line in text.splitlines():
        header = re.fullmatch(r"# \[(\w+)\]", line)
        if header:
            table = header.group(1) if header.group(1) in TABLES else None
            if table:
                uncommented.append(f"[{table}]")
        elif line.startswith("# [") or not line.startswith("#"):
            table = None  # another table ([registries."host"]), or the end of this one
        elif table and re.fullmatch(r"# \w+ = .+", line):
            uncommented.append(line[2:])
    shown = Config.from_dict(tomllib.loads("\n".join(uncommented)), env={})
    keys = {line.split(" = ")[0] for line in uncommented if " = " in line}
    for section in TABLES:
        want, got = getattr(defaults, section), getattr(shown, section)
        for name in want.__dataclass_fields__:
            assert name in keys, (f"[{section}] {name} is not shown in systemd/config.toml (the "
                                  "package's /etc/fetchd/config.toml): add it with its default")
            if getattr(want, name) is None:  # unset by default: the file shows an example
                continue
            assert getattr(got, name) == getattr(want, name), f"[{section}] {name}"
