"""Mutation score of the package's numerical core, per area, with mutmut (not run in CI).

Each area is a set of modules and the test files that exercise them. The tool makes mutmut's
mutants of every module of the ``[tool.mutmut]`` section of ``pyproject.toml``, picks a seeded
random sample of those of the chosen areas (``--sample N --seed S``; all of them without
``--sample``), runs mutmut on that sample with the areas' test files only (one mutant at a time,
each against the tests that reach its function), and prints killed / tested per area with a 95 %
Wilson interval. Mutants listed in ``tools/mutation_equivalent.txt`` (one name per line, ``#``
starts a comment) behave like the original on every input and count in neither column. A
timeout is not counted as killed either: mutmut's CPU-time limit is estimated from the traced
test durations, which miss the work of worker processes (the distributed tests), so a slow but
passing mutant can hit it. Timeouts and mutants that no selected test reaches ("no tests": code
run only inside worker processes is not traced) are listed, to be decided by running the
mutant's tests by hand.

Run from the repository root (``pip install -e .[dev]`` provides mutmut)::

    nice python tools/mutation_score.py --sample 120 --seed 0 --areas verification margins
    python tools/mutation_score.py --report-only          # the results of earlier runs
    mutmut show NAME                                      # the diff of one mutant

Mutants, stats and results live in ``mutants/`` (ignored by git); docs/testing.md gives the
figures measured and argues every survivor.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.txt"

# area -> (module globs, as in [tool.mutmut] only_mutate; test files that exercise them)
AREAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "verification": (
        ("evaluation/verification/*",),
        (
            "tests/test_verification_roc.py",
            "tests/test_verification_kfold.py",
            "tests/test_verification_templates.py",
            "tests/test_verification_bootstrap.py",
            "tests/test_verification_distractors.py",
            "tests/test_pml_verification_accuracy_calculator.py",
        ),
    ),
    "reid": (
        ("evaluation/reid/*",),
        (
            "tests/test_reid.py",
            "tests/test_reid_edges.py",
            "tests/test_reid_pml.py",
            "tests/test_reid_pml_postprocessing.py",
            "tests/test_reid_query_expansion.py",
            "tests/test_reid_rerank.py",
            "tests/test_reid_top_k.py",
            "tests/test_reid_bootstrap.py",
        ),
    ),
    "losses": (
        ("pml_largest_margin/losses/*",),
        (
            "tests/test_largest_margin_softmax_loss.py",
            "tests/test_generalized_margin_softmax_loss.py",
            "tests/test_loss_arguments.py",
            "tests/test_losses_pml_integration.py",
            "tests/test_losses_sample_margin.py",
            "tests/test_heads.py",
            "tests/test_fused_streaming.py",
            "tests/test_sub_centers.py",
            "tests/test_heads_distributed.py",
        ),
    ),
    "margins": (("pml_largest_margin/margins.py",), ("tests/test_margins.py",)),
    "regularizers": (
        ("pml_largest_margin/regularizers/*",),
        ("tests/test_regularizers.py", "tests/test_losses_sample_margin.py"),
    ),
    "distributed": (
        ("pml_largest_margin/distributed/*",),
        (
            "tests/test_distributed.py",
            "tests/test_losses_distributed.py",
            "tests/test_fused_class_parallel.py",
            "tests/test_heads_distributed.py",
            "tests/test_distributed_checkpoints.py",
        ),
    ),
}
KILLED, SURVIVED, UNDECIDED = ("killed",), ("survived",), ("timeout", "no tests")


def area_of(source_path: str) -> str | None:
    """The area whose module globs match ``source_path`` (a path relative to the root), or None."""
    for area, (globs, _tests) in AREAS.items():
        if any(fnmatch.fnmatch(source_path, pattern) for pattern in globs):
            return area
    return None


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for the default ``z``).

    Returns:
        ``(low, high)``; ``(0.0, 1.0)`` when ``trials`` is 0.
    """
    if trials == 0:
        return 0.0, 1.0
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half / denominator), min(1.0, centre + half / denominator)


def equivalent_mutants(path: Path = EQUIVALENT_FILE) -> set[str]:
    """Names of the mutants argued equivalent (one per line; ``#`` starts a comment)."""
    if not path.exists():
        return set()
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def mutant_results(mutants_dir: Path) -> dict[str, tuple[str, int | None]]:
    """``{mutant name: (source path, exit code or None if not run)}`` from mutmut's meta files."""
    results = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        source = meta.relative_to(mutants_dir).as_posix()[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            results[name] = (source, code)
    return results


def report(names: set[str] | None, mutants_dir: Path) -> int:
    """Print killed / tested per area for ``names`` (every mutant that was run when None).

    Returns:
        The number of surviving mutants not listed as equivalent.
    """
    from mutmut.stats import status_by_exit_code

    equivalent = equivalent_mutants()
    counts: dict[str, dict[str, int]] = {}
    survivors, undecided = [], []
    for name, (source, code) in mutant_results(mutants_dir).items():
        area = area_of(source)
        if area is None or code is None or (names is not None and name not in names):
            continue
        status = status_by_exit_code[code]
        if name in equivalent and status not in KILLED:
            status = "equivalent"
        elif status in SURVIVED:
            survivors.append(name)
        elif status in UNDECIDED:
            undecided.append(f"{name} ({status})")
        row = counts.setdefault(area, {})
        row[status] = row.get(status, 0) + 1
    print(
        "| area | killed | survived | equivalent | timeout or no tests | other "
        "| score (killed / killed + survived) | 95 % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    totals = {"killed": 0, "tested": 0}
    for area, row in sorted(counts.items()):
        killed = sum(row.get(status, 0) for status in KILLED)
        survived = sum(row.get(status, 0) for status in SURVIVED)
        undecided_count = sum(row.get(status, 0) for status in UNDECIDED)
        other = sum(row.values()) - killed - survived - undecided_count - row.get("equivalent", 0)
        totals["killed"] += killed
        totals["tested"] += killed + survived
        print(_score_row(area, killed, survived, row.get("equivalent", 0), undecided_count, other))
    print(_score_row("all", totals["killed"], totals["tested"] - totals["killed"], "", "", ""))
    for title, listed in (("Survivors (not listed as equivalent)", survivors),
                          ("Undecided (run their tests by hand)", undecided)):  # fmt: skip
        if listed:
            print(f"\n{title}:")
            print("\n".join(f"  {name}" for name in sorted(listed)))
    return len(survivors)


def _score_row(area: str, killed: int, survived: int, equivalent, undecided, other) -> str:
    tested = killed + survived
    low, high = wilson_interval(killed, tested)
    score = f"{100 * killed / tested:.1f} %" if tested else "-"
    return (
        f"| {area} | {killed} | {survived} | {equivalent} | {undecided} | {other} | {score} | "
        f"{100 * low:.1f}–{100 * high:.1f} % |"
    )


def generate_mutants() -> None:
    """Make (or refresh) mutmut's mutants of every configured module, without running any."""
    from mutmut import __main__ as mutmut_main

    mutmut_main.copy_src_dir()
    mutmut_main.copy_also_copy_files()
    mutmut_main.setup_source_paths()
    mutmut_main.store_lines_covered_by_tests()
    mutmut_main.create_mutants(1)


def run_sample(areas: list[str], sample: int | None, seed: int, max_children: int) -> set[str]:
    """Run mutmut on a seeded sample of the areas' mutants, with the areas' test files only.

    Returns:
        The names of the sampled mutants.
    """
    from mutmut import __main__ as mutmut_main
    from mutmut import configuration

    generate_mutants()
    candidates = sorted(
        name
        for name, (source, _code) in mutant_results(ROOT / "mutants").items()
        if area_of(source) in areas
    )
    chosen = candidates if sample is None else random.Random(seed).sample(candidates, sample)
    tests = sorted({test for area in areas for test in AREAS[area][1]})
    configuration._config = dataclasses.replace(
        configuration.config(), pytest_add_cli_args_test_selection=tests
    )
    print(f"{len(chosen)} of {len(candidates)} mutants of {', '.join(areas)}; tests: {tests}")
    try:
        mutmut_main._run(chosen, max_children)
    except SystemExit as stop:  # mutmut ends its run with exit(); the report still follows
        if stop.code not in (None, 0):
            raise
    return set(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--areas", nargs="+", choices=sorted(AREAS), default=sorted(AREAS))
    parser.add_argument("--sample", type=int, help="test a random sample of N mutants")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants run at once")
    parser.add_argument(
        "--report-only", action="store_true", help="only report the results of earlier runs"
    )
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # mutmut reads pyproject.toml and writes mutants/ in the working folder
    if args.sample is not None and args.sample < 1:
        parser.error(f"--sample must be a positive integer, got {args.sample}")
    if args.report_only:
        return 1 if report(None, ROOT / "mutants") else 0
    chosen = run_sample(args.areas, args.sample, args.seed, args.max_children)
    return 1 if report(chosen, ROOT / "mutants") else 0


if __name__ == "__main__":
    sys.exit(main())
