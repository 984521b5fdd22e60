"""The README stays true: it opens with the two commands, documents every config key and every CLI command."""

from pathlib import Path

from forge_mlx.cli import cli
from forge_mlx.config import reference

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_demo_and_test():
    first_block = README.split("```")[1]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()[1:]] == [
        "make demo",
        "make test",
    ]


def test_every_config_key_is_documented():
    missing = [key for key, _, _ in reference() if f"`{key}`" not in README]
    assert missing == []


def test_every_cli_command_is_documented():
    missing = [name for name in cli.commands if f"forge-mlx {name}" not in README]
    assert missing == []


def test_makefile_help_lists_every_target():
    makefile = (Path(__file__).parent.parent / "Makefile").read_text(encoding="utf-8")
    phony = makefile.split(".PHONY:")[1].splitlines()[0].split()
    documented = {line.split(":")[0] for line in makefile.splitlines() if "## " in line and not line.startswith("\t")}
    assert set(phony) - documented == set()
