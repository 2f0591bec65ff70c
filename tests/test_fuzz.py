"""The libFuzzer targets of helpers/fuzz/ (``make fuzz``) replay what they found.

Every crash fuzzing ever found is kept as an input under
``helpers/fuzz/regressions/<target>/``; the target run over those files (libFuzzer runs
each file given as an argument once) must not crash again. The seed corpus is replayed
the same way: a harness that cannot run its own seeds cleanly finds nothing.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
FUZZ = HELPERS / "fuzz"
BUILD = HELPERS / "build" / "fuzz"
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.c"))


@pytest.fixture(scope="module")
def built() -> Path:
    subprocess.run(["make", "-s", "-C", str(HELPERS), "fuzz-build"], check=True,
                   stdout=subprocess.DEVNULL)
    return BUILD


def replay(binary: Path, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), "-close_fd_mask=3", *map(str, files)],
                          capture_output=True, text=True, timeout=300)


def test_every_target_has_seeds_and_is_built_by_make_fuzz() -> None:
    makefile = (HELPERS / "Makefile").read_text()
    line = next(x for x in makefile.splitlines() if x.startswith("FUZZ_TARGETS"))
    assert sorted(line.split(":=")[1].split()) == TARGETS
    for target in TARGETS:
        assert any((FUZZ / "corpus" / target).iterdir()), f"no seeds for fuzz_{target}"


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_and_found_crashes_replay_clean(built: Path, target: str) -> None:
    """Every seed, and every input a fuzzing run ever crashed on (kept under
    helpers/fuzz/regressions/<target>/ once fixed), runs through the target cleanly."""
    seeds = sorted((FUZZ / "corpus" / target).iterdir())
    found = FUZZ / "regressions" / target
    cases = seeds + (sorted(found.iterdir()) if found.is_dir() else [])
    res = replay(built / f"fuzz_{target}", cases)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Executed {cases[-1]}" in res.stderr
