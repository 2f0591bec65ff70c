"""Man pages and bash completion generated from the commands' parsers (``make docs-man``):
every command gets both, the pages render without a roff warning, and bash completes
what the parsers accept."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("shifter", "setupRoot", "unsetupRoot", "shifterimg", "shifter-imagegw",
            "shifter-convert", "shifter-prep-mpi", "shifter-prep-udiimage")


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-docs")
    subprocess.run([sys.executable, str(REPO / "tools" / "cli_docs.py"), str(out)], check=True,
                   capture_output=True)
    return out


def _plain(text: str) -> str:
    """man's output without its overstrike bold and underline (``X\\bX``, ``_\\bX``)."""
    return re.sub(".\b", "", text)


@pytest.mark.parametrize("name", COMMANDS)
def test_man_page_renders_cleanly(out: Path, name: str) -> None:
    page = out / "man" / "man1" / f"{name}.1"
    proc = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "0"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = _plain(proc.stdout)
    assert text.startswith(name.upper() + "(1)") and "SEE ALSO" in text
    assert "--version" in text or name in ("shifter", "setupRoot", "unsetupRoot")


def test_man_pages_say_what_the_parsers_say(out: Path) -> None:
    def render(name: str) -> str:
        return _plain(subprocess.run(["man", "-l", str(out / "man" / "man1" / f"{name}.1")],
                                     capture_output=True, text=True, check=True,
                                     env={**os.environ, "MANWIDTH": "200"}).stdout)

    shifterimg = render("shifterimg")
    for word in ("pullnb", "--json", "--user USER", "lookup TYPE:TAG"):
        assert word in shifterimg, word
    assert "--entrypoint[=CMD]" in render("shifter")
    assert "-V          verbose" in render("setupRoot")


def _complete(out: Path, name: str, words: list[str]) -> list[str]:
    script = (f"source {out / 'completion' / 'bash' / name}\n"
              f"COMP_WORDS=({' '.join(repr(w) for w in [name, *words])})\n"
              f"COMP_CWORD={len(words)}\n"
              f"$(complete -p {name} | sed 's/.*-F \\([^ ]*\\) .*/\\1/')\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    proc = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def test_bash_completes_modes_and_options(out: Path) -> None:
    assert _complete(out, "shifterimg", ["pu"]) == ["pull", "pullnb"]
    assert _complete(out, "shifterimg", ["--js"]) == ["--json"]
    assert _complete(out, "shifterimg", ["pull", "lo"]) == []  # one mode only
    assert _complete(out, "shifter", ["--ima"]) == ["--image"]
    assert _complete(out, "shifter", ["-i", "ubuntu", "--wo"]) == ["--workdir"]
    assert _complete(out, "shifter", ["--wr"]) == ["--writable-tmpfs"]
    # Options end at the command (Shifter's getopt): its own options are not shifter's.
    assert _complete(out, "shifter", ["-i", "ubuntu", "ls", "--w"]) == []
    assert _complete(out, "shifter", ["--", "--w"]) == []
    # bash hands --opt=value over as three words
    assert _complete(out, "shifter", ["--image", "=", "ubuntu", "--wo"]) == ["--workdir"]
    assert _complete(out, "shifter", ["--workdir", "=", "/x", "ls", "--w"]) == []
    assert _complete(out, "setupRoot", ["--vers"]) == ["--version"]
    for name in COMMANDS:
        assert (out / "completion" / "bash" / name).exists()


def test_every_installed_command_has_a_page(out: Path) -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(COMMANDS) <= set(scripts)
    pages = {p.name.removesuffix(".1") for p in (out / "man" / "man1").iterdir()}
    assert pages == set(scripts)
