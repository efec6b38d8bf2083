"""Long fuzz run of every wire decoder and of task re-creation/scoring (issue 15), with its cases and time.

    python benchmarks/fuzz.py [--examples 5000] [--recreate-examples 1000] [--seed 0]

Runs the properties of tests/fuzz_cases.py (the same ones CI runs briefly in tests/test_fuzz.py) with Hypothesis
for `--examples` cases per decoder, prints a table (cases, failures, total and slowest case time, outcomes by
reason) and writes benchmarks/results/fuzz.json with the git commit and settings. Exit status 1 if any property
failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzz_cases as fc  # noqa: E402


def run(name: str, strategies: tuple, check, examples: int, rng_seed: int) -> dict:
    slowest = [0.0]
    cases = [0]

    @seed(rng_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.tuples(*strategies))
    def prop(args):
        cases[0] += 1
        slowest[0] = max(slowest[0], fc.timed(check, *args))

    start = time.perf_counter()
    error = ""
    try:
        prop()
    except Exception as e:  # a property failure: report it, keep going with the other properties
        error = f"{type(e).__name__}: {str(e)[:500]}"
    return {"property": name, "cases": cases[0], "time_s": round(time.perf_counter() - start, 2),
            "slowest_case_s": round(slowest[0], 4), "failure": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="cases per decoder")
    parser.add_argument("--recreate-examples", type=int, default=1000, help="cases for recreate/score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz.json"))
    args = parser.parse_args()

    rows = []
    for name, (_, strategy, valid) in sorted(fc.DECODERS.items()):
        rows.append(run(f"decode_{name}", (fc.encoded(strategy, valid),),
                        lambda data, name=name: fc.check_decoder(name, data), args.examples, args.seed))
    rows.append(run("recreate_and_score", (fc.decodable_specs(), fc.completions), fc.check_recreate,
                    args.recreate_examples, args.seed))

    print(f"{'property':<26}{'cases':>8}{'time s':>9}{'slowest s':>11}  failure")
    for r in rows:
        print(f"{r['property']:<26}{r['cases']:>8}{r['time_s']:>9}{r['slowest_case_s']:>11}  {r['failure'][:60] or '-'}")
    total_cases, total_s = sum(r["cases"] for r in rows), sum(r["time_s"] for r in rows)
    print(f"{'total':<26}{total_cases:>8}{total_s:>9.1f}")
    print("outcomes:", dict(sorted(fc.outcomes.items())))

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"benchmark": "fuzz", "git_commit": commit, "python": platform.python_version(),
              "settings": {"examples_per_decoder": args.examples, "recreate_examples": args.recreate_examples,
                           "seed": args.seed, "max_payload_bytes": fc.MAX_PAYLOAD_BYTES},
              "total_cases": total_cases, "total_time_s": round(total_s, 2), "properties": rows,
              "outcomes": dict(sorted(fc.outcomes.items()))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if any(r["failure"] for r in rows) else 0)


if __name__ == "__main__":
    main()
