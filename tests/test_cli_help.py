"""`kdlm <command> --help`: every field's docstring is shown, unset fields say what they resolve to (issue 15)."""

import pytest

from kdlm.cli import build_parser, main


def test_distill_help_shows_field_docstrings_and_what_unset_resolves_to(capsys):
    assert main(["distill", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the help formatter's line wrapping
    assert "Per-token divergence (docs/losses.md)" in text
    assert "fkl otherwise" in text
    assert "Weight of the distillation term against cross-entropy" in text
    assert "default: null" not in text  # an unset field says "unset", and its help says what that means
    assert "one function per subcommand" not in text  # the module's developer docstring is not the description
    assert "Train a student" in text


@pytest.mark.parametrize("command", ["distill", "eval", "validate", "cache-teacher"])
def test_every_field_has_help_and_every_unset_default_is_explained(command):
    parser = build_parser(command)
    actions = [a for a in parser._actions if a.option_strings and a.option_strings[0].startswith("--") and "." in a.option_strings[0]]
    assert len(actions) > 80
    undocumented = [a.option_strings[0] for a in actions if not a.help and not a.option_strings[0].endswith(".help")]
    assert undocumented == []
    unexplained = [
        a.option_strings[0] for a in actions
        if a.default is None and a.help and not any(w in a.help.lower() for w in ("default", "unset", "none"))
    ]
    assert unexplained == []
