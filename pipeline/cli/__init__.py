"""Command-line entry points: comp-extract, comp-train, comp-predict, comp-import."""

import argparse

from core.errors import CompError


class CliError(CompError):
    """A usage problem (a missing file, a clashing option): printed without a traceback, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is a true one worth showing; the description and the examples keep their lines.

    Not shown: required arguments, defaults of None/False/[] (the help says where the value comes from),
    on/off flags (a store_false flag's own "default" is the opposite of what it does), and help that already
    names its default.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.required or action.nargs == 0 or action.default in (None, False, [], argparse.SUPPRESS)
                or "(default" in text):
            return action.help
        return super()._get_help_string(action)
