#!/usr/bin/env python3
"""Write fetchd(1), the man page, from the CLI's own argparse parser (``fetchd.cli._parser``).

Usage: ``python3 scripts/manpage.py [-o FILE]`` (default: standard output). The Debian package
builds its man page with it, so every command, option, metavar, choice and help text in the page
is the one ``fetchd --help`` shows; nothing is written by hand twice. Only the sections argparse
knows nothing of (exit status, environment, files) are fixed here, keyed to the CLI's constants.

Invariant: the output is plain man(7) roff, depends only on the parser and
``SOURCE_DATE_EPOCH`` (the page date; reproducible builds), and escapes every text it copies
(backslashes, hyphens of option names, lines starting with ``.`` or ``'``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "client"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fetchd_client import RECONNECT_ENV, RECONNECT_TIMEOUT  # noqa: E402

from fetchd import __version__, cli  # noqa: E402
from fetchd.config import (  # noqa: E402
    DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET_PATH,
    DEFAULT_STORE_PATH,
)


def esc(text: str) -> str:
    """Text for a roff line: backslashes doubled, hyphens literal, no control-line start."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + out if out.startswith((".", "'")) else out


def _option_label(action: argparse.Action) -> str:
    """``\\fB\\-o\\fR, \\fB\\-\\-output\\fR \\fIOUTPUT\\fR`` for an option, ``\\fIREF\\fR`` for a positional."""
    metavar = action.metavar
    if metavar is None and action.choices is not None and not action.option_strings:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    if metavar is None:
        metavar = action.dest.upper()
    if not action.option_strings:
        return f"\\fI{esc(str(metavar))}\\fR"
    names = ", ".join(f"\\fB{esc(s)}\\fR" for s in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None and action.metavar is None:
        return f"{names} {{{esc(','.join(map(str, action.choices)))}}}"
    return f"{names} \\fI{esc(str(metavar))}\\fR"


def _then(text: str, more: str) -> str:
    """``text`` and one more sentence."""
    if not text:
        return more
    return f"{text}{'' if text.endswith(('.', ')')) else '.'} {more}"


def _option_text(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices is not None and action.option_strings and action.metavar is None:
        text = _then(text, "One of: " + ", ".join(map(str, action.choices)) + ".")
    if (action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
            and "default" not in text):
        text = _then(text, f"Default: {action.default}.")
    if action.required and action.option_strings:
        text = _then(text, "Required.")
    return esc(text) if text else ""


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        lines += [".TP", _option_label(action)]
        text = _option_text(action)
        if text:
            lines.append(text)
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = " ".join(parser.format_usage().split())
    return usage.removeprefix("usage: ")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of every subcommand, in the parser's order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


EXIT_STATUS = (
    (0, "success (for pull and deliver: OUTPUT is complete and its digest was checked)"),
    (cli.EXIT_ERROR, "an error the daemon or the client reported; one line "
                     "\"fetchd: error: ...\" on standard error says what to do"),
    (cli.EXIT_USAGE, "bad usage"),
    (cli.EXIT_UNREACHABLE, "the daemon is not reachable on its socket"),
    (cli.EXIT_INTERRUPTED, "interrupted"),
)

ENVIRONMENT = (
    ("FETCHD_SOCKET", f"the daemon's socket, for every command (default {DEFAULT_SOCKET_PATH})"),
    (RECONNECT_ENV, "seconds a client command waits for a daemon that went away in the middle "
                    "of a request (a restart, an upgrade) to come back, then resubmits it "
                    f"(default {RECONNECT_TIMEOUT:g}; 0: fail at once)"),
    ("FETCHD_CONFIG", f"the config file of fetchd serve (default {DEFAULT_CONFIG_PATH})"),
    ("FETCHD_STORE", f"the store of fetchd serve when neither --store nor the config names one "
                     f"(default {DEFAULT_STORE_PATH})"),
    ("REGISTRY_AUTH_FILE", "registry credentials of the daemon (else ~/.docker/config.json or "
                           "~/.config/containers/auth.json of its user)"),
)

FILES = (
    (DEFAULT_CONFIG_PATH, "the daemon's configuration (TOML; every setting has a default)"),
    (DEFAULT_SOCKET_PATH, "the socket; members of the group fetchd may connect"),
    (DEFAULT_STORE_PATH, "the layer store (world-readable; files 0444)"),
    ("/usr/share/fetchd/bitbake-client", "the BitBake layer: BBLAYERS += and INHERIT += \"fetchd\""),
    ("/usr/share/doc/fetchd", "README.md and the design, API, BitBake and install documents"),
)


def render(parser: argparse.ArgumentParser | None = None, date: str | None = None) -> str:
    parser = parser or cli._parser()
    if date is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
        date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    prog = parser.prog
    description = parser.description or ""
    summary = description.split(":")[0].rstrip(".")
    lines = [
        f'.TH {prog.upper()} 1 "{date}" "{prog} {esc(__version__)}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- {esc(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
    ]
    subs = _subcommands(parser)
    lines += [".nf", esc(_usage(parser)), *(esc(_usage(sub)) for _, _, sub in subs), ".fi"]
    lines += [".SH DESCRIPTION", esc(description)]
    lines += [".SH OPTIONS", *_options(parser)]
    lines.append(".SH COMMANDS")
    for name, help_text, sub in subs:
        lines += [f".SS {esc(name)}", esc(help_text[0].upper() + help_text[1:]) + "."
                  if help_text else "", *_options(sub)]
    lines.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", esc(text)]
    lines.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        lines += [".TP", f"\\fB{name}\\fR", esc(text)]
    lines.append(".SH FILES")
    for path, text in FILES:
        lines += [".TP", f"\\fI{esc(path)}\\fR", esc(text)]
    lines += [".SH SEE ALSO", "\\fBsystemd.socket\\fR(5), \\fBjournalctl\\fR(1), "
              "\\fBskopeo\\fR(1); /usr/share/doc/fetchd/README.md"]
    return "\n".join(line for line in lines if line != "") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write fetchd(1) from the CLI's parser")
    ap.add_argument("-o", "--output", help="file to write (default: standard output)")
    args = ap.parse_args(argv)
    page = render()
    if args.output:
        Path(args.output).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
