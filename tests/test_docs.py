"""The README and docs say what the project ships and does (issue 15): recipes, KDLM_CACHE, the chromium install."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def _listed_recipes(path: Path) -> list[str]:
    """The recipe names between the ``<!-- recipes -->`` and ``<!-- /recipes -->`` markers of ``path``."""
    text = path.read_text(encoding="utf-8")
    match = re.search(r"<!-- recipes -->(.*?)<!-- /recipes -->", text, re.S)
    assert match, f"{path.name}: no <!-- recipes --> ... <!-- /recipes --> list"
    return sorted(set(re.findall(r"configs/([A-Za-z0-9_]+)\.yaml", match.group(1))))


@pytest.mark.parametrize("doc", ["README.md", "docs/config.md"])
def test_docs_list_exactly_the_shipped_recipes(doc):
    assert len(RECIPES) >= 14
    assert _listed_recipes(ROOT / doc) == RECIPES


def _section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def test_readme_setup_names_kdlm_cache_and_the_chromium_install():
    setup = _section((ROOT / "README.md").read_text(encoding="utf-8"), "## Set-up")
    assert "KDLM_CACHE" in setup and "~/.cache/kdlm" in setup
    assert "chromium" in setup and "apt-get" in setup and "root" in setup


def test_makefile_says_so_before_installing_chromium():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nchromium:", 1)[1].split("\n\n", 1)[0]
    assert "apt-get install" in recipe
    before = recipe.split("apt-get update", 1)[0]
    assert re.search(r"echo \"[^\"]*chromium[^\"]*\"", before), "no line printed before apt-get runs"
