"""`--help` that fits one screen. A command whose full help is longer than SCREEN_LINES shows its
usage, its description and its small option groups as usual, and the flag names of each large group
(the flags generated from a config: every one is a key of docs/configuration.md) without their help;
`--help-all` prints the full help. Every help ends with the docs page that says more."""
from __future__ import annotations

import argparse
import sys
import textwrap

SCREEN_LINES = 40  # at 100 columns
LARGE_GROUP = 7  # a group with more options than this lists their names only


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(parser.format_full_help(), sys.stdout)
        parser.exit()


class ScreenParser(argparse.ArgumentParser):
    """An ArgumentParser (its subcommands' parsers too) whose --help fits SCREEN_LINES and names
    `docs`, the page with more; `--help-all` prints argparse's full help."""

    def __init__(self, *args, docs: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.docs = docs
        self.config_keys = False  # its flags are config keys (docs/configuration.md)
        if self.add_help and "-" in self.prefix_chars:
            self.add_argument("--help-all", action=_HelpAll, help=argparse.SUPPRESS)

    def _docs_line(self) -> str:
        return f"More: {self.docs} (in the repository)." if self.docs else ""

    def format_full_help(self) -> str:
        text = super().format_help()
        return text + ("\n" + self._docs_line() + "\n" if self.docs else "")

    def format_help(self) -> str:
        full = self.format_full_help()
        if len(full.splitlines()) <= SCREEN_LINES:
            return full
        return self.format_compact_help()

    def _usage(self) -> str:
        parts = [self.prog]
        for action in self._actions:
            if action.option_strings and action.required:
                parts.append(f"{action.option_strings[0]} {action.metavar or action.dest.upper()}")
            elif not action.option_strings and action.help is not argparse.SUPPRESS:
                name = action.metavar or action.dest
                parts.append(f"[{name}]" if action.nargs in ("?", "*") else name)
        return "usage: " + " ".join(parts + ["[options]"])

    def format_compact_help(self) -> str:
        width = self._get_formatter()._width  # what argparse wraps to (COLUMNS, less a margin)
        fmt = self._get_formatter()
        fmt.add_text(self._usage())
        fmt.add_text(self.description)
        listed = False
        for group in self._action_groups:
            actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
            if not actions:
                continue
            fmt.start_section(group.title)
            if len(actions) > LARGE_GROUP:  # names only, wrapped between flags, never inside one
                listed = True
                names = " ".join(a.option_strings[0] if a.option_strings else a.dest for a in actions)
                self._add_wrapped(fmt, names, width, indent="  ")
            else:
                fmt.add_text(group.description)
                fmt.add_arguments(actions)
            fmt.end_section()
        fmt.add_text(self.epilog)
        if listed:
            self._add_wrapped(fmt, "--help-all shows each flag listed by name with its help" + (
                "; docs/configuration.md describes each config key with its default." if self.config_keys else "."), width)
        self._add_wrapped(fmt, self._docs_line(), width)
        return fmt.format_help()

    @staticmethod
    def _add_wrapped(fmt, text: str, width: int, indent: str = "") -> None:
        """`text` wrapped at spaces only (a flag is never split), whatever the formatter class."""
        if text:
            fmt._add_item(lambda t: t, ["\n".join(textwrap.wrap(
                text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False,
                break_long_words=False)) + "\n\n"])
