"""Mutation testing of the stages' wiring with mutmut (``make mutation``; a benchmark, not part of CI).

Each module is mutated against its own fast pool of tests (the wiring tests and the module's own tests,
``GROUPS`` below; never the CLI tests, which start processes that would import the unmutated package).
A group runs in its own scratch copy of the repository, ``mutation/<group>/``, whose pyproject.toml has
the ``[tool.mutmut]`` section of the repository with that group's files and tests; mutmut runs, for each
mutant, only the tests of the pool that execute the mutated function. Then the kill rate per module is
printed and the survivors listed. Mutants listed in docs/mutation.md as equivalent (no behaviour changes)
are left out of the rate. Results accumulate: a second call continues where the first stopped (mutmut
keeps what it has tested); ``--report`` only prints.

    python scripts/mutation.py                  # every group (hours on 2 cores)
    python scripts/mutation.py svd finetune     # some groups
    python scripts/mutation.py --report         # the table of what has run so far
    python scripts/mutation.py train --recheck  # survivors again, all in one process (see recheck())
    python scripts/mutation.py pipeline --recheck --unrun --sample 60  # a random sample of the untested
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "mutation"
EQUIVALENT_DOC = ROOT / "docs" / "mutation.md"
COPIED = ("src", "tests", "data/sample", "pyproject.toml")

WIRING = [
    "tests/methods/test_pretrain_wiring.py",
    "tests/methods/test_finetune_wiring.py",
    "tests/methods/test_wiring_losses.py",
    "tests/methods/test_class_balance.py",
]
# group -> (files mutated, test pool)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "svd": (
        ["src/mics/methods/svd.py"],
        ["tests/methods/test_svd.py", "tests/methods/test_svd_shifts.py", *WIRING],
    ),
    "pretrain": (
        ["src/mics/methods/pretrain.py"],
        [
            "tests/methods/test_stage_modules.py",
            "tests/methods/test_pretrain_orders.py",
            *WIRING,
            "tests/methods/test_baseline_wiring.py",
        ],
    ),
    "finetune": (
        ["src/mics/methods/finetune.py"],
        ["tests/methods/test_stage_modules.py", "tests/methods/test_finetune_batches.py", *WIRING],
    ),
    "baseline": (
        ["src/mics/methods/baseline.py"],
        [
            "tests/methods/test_baseline_wiring.py",
            "tests/methods/test_baseline_training.py",
            "tests/methods/test_class_balance.py",
        ],
    ),
    "train": (
        ["src/mics/engine/train.py"],
        [
            "tests/engine/test_train.py",
            "tests/engine/test_train_resume.py",
            "tests/methods/test_baseline_wiring.py",
        ],
    ),
    "budget": (
        ["src/mics/methods/budget.py"],
        ["tests/methods/test_budget.py", "tests/methods/test_baseline_training.py"],
    ),
    "ssl": (["src/mics/methods/ssl/*"], ["tests/methods/ssl", "tests/methods/test_baseline_wiring.py"]),
    "predict": (["src/mics/predict.py"], ["tests/test_pipeline_predict.py", "tests/test_export.py"]),
    "pipeline": (
        ["src/mics/pipeline.py"],
        [
            "tests/test_pipeline_splits.py",
            "tests/test_pipeline_resume.py",
            "tests/test_pipeline_predict.py",
            "tests/test_pipeline_refusals.py",
            # the CLI in-process (tests/test_cli_os_errors.py's cli()), so through the mutated module
            "tests/test_bad_inputs.py",
            "tests/test_cli_os_errors.py",
        ],
    ),
}
# the draws of --sample: per draw a "# draw ..." line, then "NAME EXIT_CODE" per mutant as it is tested,
# so the outcome against the suite of the time stays on record when later tests kill the survivors
SAMPLED = "sampled.txt"
CAUGHT = ("killed", "timeout")  # what the kill rate counts as caught (see report())
KILLED = {1, 3, -9, -11}  # test failure, pytest internal error, killed by a signal (crash)
STATUS = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout", 24: "timeout"}
STATUS.update({-24: "timeout", 152: "timeout", 255: "timeout", 37: "type check"})


def module_of(mutant: str) -> str:
    """``mics.methods.svd.x_build_dictionary__mutmut_3`` -> ``mics.methods.svd``."""
    return re.split(r"\.x[_ǁ]", mutant, maxsplit=1)[0]


def equivalent_mutants() -> set[str]:
    """Names in docs/mutation.md's list: lines ``- `name`: reason``."""
    if not EQUIVALENT_DOC.exists():
        return set()
    return set(re.findall(r"^- `([^`]+__mutmut_\d+)`", EQUIVALENT_DOC.read_text(encoding="utf-8"), re.M))


def results(group: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for meta in (WORK / group / "mutants").rglob("*.py.meta"):
        out.update(json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"])
    return out


def scored_status(name: str, code: int | None, equivalent: set[str]) -> str:
    """``status``, except that a listed equivalent mutant the tests did not kill counts as "equivalent"."""
    s = status(code)
    return "equivalent" if name in equivalent and s != "killed" else s


def status(code: int | None) -> str:
    if code is None:
        return "not run"
    if code in KILLED:
        return "killed"
    return STATUS.get(code, "suspicious")


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def prepare(group: str) -> Path:
    """The group's scratch copy, refreshed from the working tree (mutmut's own results are kept)."""
    files, tests = GROUPS[group]
    folder = WORK / group
    folder.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = ROOT / name, folder / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    base = re.search(r"^\[tool\.mutmut\]\n(.*?)(?=^\[)", text, re.M | re.S)
    if base is None:
        raise SystemExit("pyproject.toml has no [tool.mutmut] section")
    keep = [
        line
        for line in base.group(1).splitlines()
        if line.split("=")[0].strip() in ("source_paths", "also_copy", "process_isolation")
    ]
    section = "\n".join(
        [
            "[tool.mutmut]",
            *keep,
            f"only_mutate = {_toml_list(files)}",
            f"pytest_add_cli_args_test_selection = {_toml_list(tests)}",
            "",
            "",
        ]
    )
    (folder / "pyproject.toml").write_text(
        text[: base.start()] + section + text[base.end() :], encoding="utf-8"
    )
    return folder


# groups whose module takes no part in training a run: their tests' trained runs are built once per recheck
# and reused by every mutant (tests/conftest.py, run_folder) instead of being trained again for each
REUSE_RUNS = ("predict",)
# a mutant whose tests run longer than this (an endless loop) counts as a timeout: at least RECHECK_TIMEOUT_S,
# and TIMEOUT_FACTOR times its tests' clean duration where they train runs (pipeline), so that a loaded
# machine does not pass a slow test off as a caught mutant
RECHECK_TIMEOUT_S = 180
TIMEOUT_FACTOR = 4


def recheck(
    group: str, unrun: bool = False, sample: int | None = None, timeouts: bool = False
) -> Counter[str]:
    """Test the group's surviving mutants again in ONE process (``pytest.main`` per mutant, the mutant
    chosen through mutmut's own ``MUTANT_UNDER_TEST`` switch) and write each outcome into mutmut's
    results, as mutmut would. mutmut starts a process per mutant, which costs a ~30 s import of torch on
    the 2-core machines; this costs it once. Any kill found this way is a real kill (the same trampolines
    and tests); a mutant that survives here was also tested with the group's whole pool, not only the
    tests that execute it, so nothing is counted killed that mutmut would not count.

    ``sample``: test only that many of the untested mutants, drawn at random (seeded by group and time),
    for modules whose mutants each cost minutes; each draw is recorded in ``mutation/<group>/sampled.txt``
    with the outcomes it had when drawn, and the report estimates the module's kill rate from it.
    ``timeouts``: test the timed-out mutants again too (with the timeout below)."""
    import os
    import signal

    import pytest

    folder = prepare(group)
    mutants = folder / "mutants"
    if not (mutants / "mutmut-stats.json").exists():
        generate(folder)
    stale = stale_functions(group)
    if stale:
        raise SystemExit(
            f"{group}: the mutants are of older code ({', '.join(stale[:5])} changed since); "
            f"run python scripts/mutation.py {group} to mutate the current code"
        )
    # mutmut's copies of the modules it does not mutate are from its own run: bring them up to date, or a
    # test would run the mutated module against older code (and, where a test starts `mics` in a new
    # process, which imports the working tree, mix the two)
    mutated = GROUPS[group][0]
    for path in (ROOT / "src").rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and "__pycache__" not in rel and not any(fnmatch.fnmatch(rel, m) for m in mutated):
            (mutants / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, mutants / rel)
    if group in REUSE_RUNS:
        runs = folder / "runs"
        shutil.rmtree(runs, ignore_errors=True)  # runs of older code
        os.environ["MICS_TEST_RUN_CACHE"] = str(runs)
    # mutmut's own copy of the tests is from its last run: bring in the tests written since
    shutil.copytree(
        ROOT / "tests", mutants / "tests", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    sys.path.insert(0, str(mutants / "src"))
    os.chdir(mutants)
    _, tests = GROUPS[group]
    pool = [t for t in tests if (mutants / t).exists()]
    for name in list(sys.modules):
        if name == "mics" or name.startswith("mics."):
            del sys.modules[name]  # the mutated copy, not the installed package
    equivalent = equivalent_mutants()
    skip: tuple[str, ...] = CAUGHT if unrun else (*CAUGHT, "not run")  # a hang is caught already
    if timeouts:  # ... unless the timeout was too short for the tests, as on a loaded machine
        skip = tuple(s for s in skip if s != "timeout")
    before = results(group)
    todo = [n for n, c in before.items() if status(c) not in skip and n not in equivalent]
    todo.sort(key=lambda n: (before[n] is not None, n))  # the untested first: most of them die quickly
    if sample is not None:
        untested = [n for n in todo if before[n] is None]
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "tests"], cwd=ROOT, check=False)
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        # seeded by the draw's time too: a group's folder is not kept between machines, and a seed of the
        # group alone would draw again, in a new folder, the mutants an earlier draw led tests to target
        seed = f"{group} {stamp}"
        random.Random(seed).shuffle(untested)
        todo = untested[:sample]
        with (folder / SAMPLED).open("a", encoding="utf-8") as fh:
            fh.write(
                f"# draw {stamp}, tests of {commit}{' + uncommitted' if dirty.returncode else ''}, "
                f"seed {seed!r}\n"
            )
    # mutmut's map of which tests execute each function, completed by map_tests() for the tests written
    # after it was made; each mutant runs only the tests that execute its function
    stats = json.loads((mutants / "mutmut-stats.json").read_text(encoding="utf-8"))
    by_function: dict[str, list[str]] = stats["tests_by_mangled_function_name"]
    duration: dict[str, float] = stats.get("duration_by_test", {})
    mapped = {t for tests_ in by_function.values() for t in tests_}

    if group in REUSE_RUNS:
        # train the reused runs now, with the original code and outside the timeout: --setup-only builds
        # the fixtures without running a test (the mapping below then reuses them too)
        os.environ["MUTANT_UNDER_TEST"] = ""  # mutmut's "no mutant"
        pytest.main([*pool, "-q", "--setup-only", "-p", "no:cacheprovider"])

    class Collect:
        ids: list[str] = []

        def pytest_collection_modifyitems(self, items: list[Any]) -> None:
            self.ids.extend(item.nodeid for item in items)

    collector = Collect()
    pytest.main([*pool, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[collector])
    unmapped = [t for t in collector.ids if t not in mapped]
    if unmapped:
        for function, tests_ in map_tests(unmapped, duration).items():
            by_function.setdefault(function, []).extend(tests_)
    counts: Counter[str] = Counter()

    timed_out = [False]

    def on_alarm(signum: int, frame: object) -> None:
        timed_out[0] = True  # pytest reports the error below as a failed test: not a kill, a timeout
        raise TimeoutError("mutant timed out")

    signal.signal(signal.SIGALRM, on_alarm)
    for i, name in enumerate(todo, 1):
        os.environ["MUTANT_UNDER_TEST"] = name
        function = re.sub(r"__mutmut_\d+$", "", name)
        # fastest first: with -x a killed mutant stops at its first failing test
        selected = sorted(set(by_function.get(function, [])), key=lambda t: (duration.get(t, 1e9), t))
        clean = sum(duration.get(t, 0.0) for t in selected)
        signal.alarm(max(RECHECK_TIMEOUT_S, math.ceil(TIMEOUT_FACTOR * clean)))
        timed_out[0] = False
        try:
            # --tb=no: a traceback through mutmut's copy of a module (every mutant inlined, thousands of
            # lines) takes pytest seconds to format, and only pass or fail matters here
            if selected:  # (pytest.main with no test named would run every test under the folder)
                code = int(pytest.main([*selected, "-x", "-q", "--tb=no", "-p", "no:cacheprovider"]))
                code = {0: 0, 1: 1, 5: 33}.get(code, code)
            else:
                code = 33
        except TimeoutError:
            pass  # raised outside a test; on_alarm has set the flag either way
        finally:
            signal.alarm(0)
        if timed_out[0]:
            code = 36
        counts[status(code)] += 1
        print(f"[{i}/{len(todo)}] {name}: {status(code)}", file=sys.stderr, flush=True)
        _store(mutants, {name: code})  # after each mutant: an interrupted recheck keeps what it found
        if sample is not None:
            with (folder / SAMPLED).open("a", encoding="utf-8") as fh:
                fh.write(f"{name} {code}\n")
    os.environ.pop("MUTANT_UNDER_TEST", None)
    os.chdir(ROOT)
    return counts


def generate(folder: Path) -> None:
    """Let mutmut create the group's mutants and its map of which tests execute which function, then stop
    it before it tests any mutant itself (the recheck does that, in one process)."""
    import os
    import signal
    import time

    stats = folder / "mutants" / "mutmut-stats.json"
    print(f"$ (cd {folder.relative_to(ROOT)} && mutmut run)  # until its map is written", file=sys.stderr)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mutmut", "run", "--max-children", "1"], cwd=folder, start_new_session=True
    )

    def written() -> bool:  # the file appears when mutmut opens it: wait until it is whole
        try:
            json.loads(stats.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return True

    while proc.poll() is None and not written():
        time.sleep(1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    if not written():
        raise SystemExit(f"mutmut stopped (exit {proc.returncode}) before it wrote {stats}")


def map_tests(tests: list[str], duration: dict[str, float]) -> dict[str, list[str]]:
    """Which mutated functions each test executes, recorded as mutmut records its own map (its
    ``stats`` switch makes every trampoline note its function): for the tests written after mutmut's
    last run, so that each mutant runs only the tests that reach its function instead of all of them.
    Runs in the mutants folder, in the recheck's process; adds each test's duration to ``duration``."""
    import os

    import pytest
    from mutmut.configuration import config
    from mutmut.state import state

    config()  # read mutmut's config now, from the mutants folder: a test that changes directory would
    # otherwise make the stats trampoline look for it there, fail, and leave the test unmapped
    found: dict[str, list[str]] = defaultdict(list)

    class Record:
        def pytest_runtest_teardown(self, item: Any, nextitem: Any) -> None:
            for function in state()._stats:
                found[function].append(item.nodeid)
            state()._stats.clear()

        def pytest_runtest_makereport(self, item: Any, call: Any) -> None:
            if call.when == "call":
                duration[item.nodeid] = call.duration

    os.environ["MUTANT_UNDER_TEST"] = "stats"
    state()._stats.clear()
    print(f"mapping {len(tests)} test(s) newer than mutmut's map to their functions", file=sys.stderr)
    pytest.main([*tests, "-q", "-p", "no:cacheprovider"], plugins=[Record()])
    os.environ.pop("MUTANT_UNDER_TEST", None)
    return dict(found)


def stale_functions(group: str) -> list[str]:
    """Functions whose original (``x_NAME__mutmut_orig`` in mutmut's copy) differs from the current
    source: their mutants, and the results of earlier runs, are of older code."""
    import ast
    import glob

    def bodies(tree: ast.AST, mangled: bool) -> dict[str, str]:
        out: dict[str, str] = {}
        scopes: list[tuple[str, ast.AST]] = [("", tree)]
        scopes += [(n.name, n) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        for owner, scope in scopes:
            for node in getattr(scope, "body", []):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                name = node.name
                if mangled:
                    if not name.endswith("__mutmut_orig"):
                        continue
                    name = name.removesuffix("__mutmut_orig").split("ǁ")[-1].removeprefix("x_")
                key = f"{owner}.{name}" if owner else name
                out[key] = ast.dump(ast.Module(body=node.body, type_ignores=[]))
        return out

    changed: list[str] = []
    files, _ = GROUPS[group]
    for pattern in files:
        for path in sorted(glob.glob(str(ROOT / pattern))):
            rel = Path(path).relative_to(ROOT)
            copy = WORK / group / "mutants" / rel
            if not copy.exists():
                changed.append(str(rel))
                continue
            now = bodies(ast.parse(Path(path).read_text(encoding="utf-8")), mangled=False)
            then = bodies(ast.parse(copy.read_text(encoding="utf-8")), mangled=True)
            changed += [f"{rel}:{k}" for k, v in then.items() if now.get(k) != v]
    return changed


def _store(mutants: Path, outcome: dict[str, int]) -> None:
    """Write exit codes into mutmut's results (``*.py.meta``), where ``results()`` reads them."""
    for meta in mutants.rglob("*.py.meta"):
        data = json.loads(meta.read_text(encoding="utf-8"))
        hits = {k: v for k, v in outcome.items() if k in data["exit_code_by_key"]}
        if hits:
            data["exit_code_by_key"].update(hits)
            meta.write_text(json.dumps(data, indent=4), encoding="utf-8")


def report(groups: list[str]) -> int:
    """Print the table; returns the number of non-equivalent survivors."""
    equivalent = equivalent_mutants()
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for group in groups:
        for name, code in sorted(results(group).items()):
            s = scored_status(name, code, equivalent)
            by_module[module_of(name)][s] += 1
            if s in ("survived", "no tests", "timeout", "suspicious"):
                survivors[module_of(name)].append(f"{name} ({s})")
    header = (
        f"{'module':28} {'mutants':>7} {'run':>5} {'killed':>6} {'timeout':>7} {'equiv':>5} {'alive':>5}"
        f" {'kill rate':>9}"
    )
    print(header)
    print("-" * len(header))
    total: Counter[str] = Counter()
    for module in sorted(by_module):
        total.update(by_module[module])
        print(_row(module, by_module[module]))
    print("-" * len(header))
    print(_row("all", total))
    print(
        "\nkill rate = (killed + timeout) / (run - equivalent), as mutmut scores it: a mutant that makes the"
        "\ntests hang is caught (listed below all the same); 'alive' = survived, no test or suspicious"
    )
    estimates = [line for group in groups for line in sample_estimates(group, equivalent)]
    if estimates:
        print("\n" + "\n".join(estimates))
    for module in sorted(survivors):
        print(f"\nsurvivors in {module} (see them with: cd mutation/<group> && mutmut show NAME):")
        for line in survivors[module]:
            print(f"  {line}")
    return sum(len(v) for v in survivors.values())


def sample_estimates(group: str, equivalent: set[str]) -> list[str]:
    """Per ``--sample`` draw: the kill rate of its mutants when they were drawn, with its 95 % Wilson
    interval (an unbiased estimate of the whole module's rate for the suite of that time, equivalents as
    listed now), and the same mutants now. The table's rate is over every tested mutant, which for a
    partly run module need not be a random subset."""
    from mics.card import wilson_interval

    path = WORK / group / SAMPLED
    if not path.exists():
        return []
    draws: list[tuple[str, dict[str, int]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            draws.append((line.lstrip("# "), {}))
        elif line.strip() and draws:
            name, code = line.split()
            draws[-1][1][name] = int(code)
    now = results(group)
    lines = []
    for header, outcome in draws:
        scored = [n for n in outcome if scored_status(n, outcome[n], equivalent) != "equivalent"]
        if not scored:
            continue
        caught = sum(status(outcome[n]) in CAUGHT for n in scored)
        caught_now = sum(status(now.get(n)) in CAUGHT for n in scored)
        low, high = wilson_interval(caught, len(scored))
        lines.append(
            f"{group} {header}: {len(outcome)} random mutants, {len(outcome) - len(scored)} equivalent; "
            f"{caught} of {len(scored)} caught when drawn, {100 * caught / len(scored):.1f} % "
            f"(95 % Wilson interval {100 * low:.1f}-{100 * high:.1f} %); {caught_now} caught now"
        )
    return lines


def _row(name: str, c: Counter[str]) -> str:
    n = sum(c.values())
    run = n - c["not run"] - c["skipped"]
    alive = c["survived"] + c["no tests"] + c["suspicious"]
    caught = c["killed"] + c["timeout"]
    scored = caught + alive
    rate = f"{100 * caught / scored:.1f} %" if scored else "-"
    counts = f"{n:7d} {run:5d} {c['killed']:6d} {c['timeout']:7d} {c['equivalent']:5d} {alive:5d}"
    return f"{name:28} {counts} {rate:>9}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("groups", nargs="*", help=f"groups to run (default: {', '.join(GROUPS)})")
    parser.add_argument("--report", action="store_true", help="only print the results so far")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel")
    parser.add_argument(
        "--survivors", action="store_true", help="test the surviving mutants again (after new tests)"
    )
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="like --survivors, but in one process (no per-mutant import of torch); one group at a time",
    )
    parser.add_argument(
        "--unrun", action="store_true", help="with --recheck: also the mutants mutmut has not tested yet"
    )
    parser.add_argument(
        "--timeouts", action="store_true", help="with --recheck: also the mutants that timed out (test again)"
    )
    parser.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="with --recheck --unrun: only N of the untested mutants, drawn at random (slow modules)",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    groups = args.groups or list(GROUPS)
    if not args.report and importlib.util.find_spec("mutmut") is None:
        print("mutmut is not installed: pip install -e '.[mutation]' (or run make mutation)", file=sys.stderr)
        return 2
    if args.recheck:
        if len(groups) != 1:
            parser.error("--recheck takes exactly one group")
        if args.sample is not None and (not args.unrun or args.sample < 1):
            parser.error("--sample takes a positive N and goes with --unrun")
        counts = recheck(groups[0], unrun=args.unrun, sample=args.sample, timeouts=args.timeouts)
        print(dict(counts), file=sys.stderr)
    elif not args.report:
        for group in groups:
            folder = prepare(group)
            cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
            if args.survivors:
                alive = [n for n, c in results(group).items() if status(c) not in ("killed", "not run")]
                alive = [n for n in alive if n not in equivalent_mutants()]
                if not alive:
                    continue
                cmd += alive
            shown = " ".join(["mutmut", *cmd[3:]]) if len(cmd) < 12 else f"mutmut {' '.join(cmd[3:6])} ..."
            print(f"$ (cd {folder.relative_to(ROOT)} && {shown})", flush=True)
            subprocess.run(cmd, cwd=folder, check=False)
    report(groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
