"""Flag help taken from the config models' field docstrings reads as whole sentences."""

from __future__ import annotations

import re

import pytest

from semidyn_rag import cli
from semidyn_rag._cli_fields import FIELDS


@pytest.mark.parametrize(
    ("description", "first"),
    [
        ("λ of Eq. 7.", "λ of Eq. 7"),
        ("Draws from these (default: all); e.g. the low ones. More here.", None),
        ("Keep it, i.e. frozen. Later text.", "Keep it, i.e. frozen"),
        ("One sentence. (An aside in brackets.)", "One sentence"),
        ("Decays to `lr`. Another.", "Decays to `lr`"),
        ("No full stop", "No full stop"),
        ("", ""),
    ],
)
def test_first_sentence_does_not_stop_at_abbreviations(description, first):
    expected = first if first is not None else "Draws from these (default: all); e.g. the low ones"
    assert cli._first_sentence(description) == expected


def test_no_shipped_flag_help_is_cut_mid_sentence():
    cut = re.compile(r"(\b(Eq|e\.g|i\.e|cf|vs|etc)|``)$")
    for section, specs in FIELDS.items():
        for spec in specs:
            assert not cut.search(spec["help"]), (section, spec["name"], spec["help"])
            assert "``" not in spec["help"], (section, spec["name"])


@pytest.mark.parametrize(
    ("argv", "quiet", "verbose"),
    [
        (["store", "info", "x", "-q"], True, 0),
        (["-q", "store", "info", "x"], True, 0),
        (["store", "check", "x", "-vv"], False, 2),
        (["-v", "store", "check", "x"], False, 1),
        (["store", "info", "x"], False, 0),
        (["precompress", "--help-not-needed"], None, None),
    ],
)
def test_output_flags_work_before_and_after_the_subcommand(argv, quiet, verbose):
    parser = cli.build_parser()
    if quiet is None:  # an unknown flag is still refused
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        return
    args = parser.parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_every_subcommand_takes_the_output_flags():
    parser = cli.build_parser()
    for child in cli._subparsers(parser):
        options = {s for a in child._actions for s in a.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose"} <= options, child.prog
