"""``python -m bench``: run the benchmarks, re-plot a results file, summarize a profile.

    python -m bench run [--quick] [--out DIR] [--only NAME,...] [--name NAME] [--profile]
                        [--repeat N] [--noise] [--wait-quiet S]
    python -m bench report bench/results/latest.json     # re-plot, print the goal table
    python -m bench profile FILE.txt                      # top functions of a py-spy raw profile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.run import EXTRA_SCENARIOS, SCENARIOS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the scenarios")
    r.add_argument("--quick", action="store_true", help="~1-2 s per case, 500 idle connections")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default bench/results)")
    r.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(SCENARIOS + EXTRA_SCENARIOS)}")
    r.add_argument("--name", default="latest", help="results file stem (default latest -> latest.json)")
    r.add_argument("--profile", action="store_true",
                   help="py-spy record every zrpc server during its measurement (raw stacks + top functions)")
    r.add_argument("--keep-logs", action="store_true", help="keep the temporary work dir with process logs")
    r.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run every selected scenario N times, interleaved; report medians and ranges")
    r.add_argument("--noise", action="store_true",
                   help="also run each scenario under a background load keeping one core ~50%% busy")
    r.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each scenario wait up to SECONDS for the machine to be nearly idle")
    rep = sub.add_parser("report", help="re-plot a results file and print its tables")
    rep.add_argument("file", type=Path)
    prof = sub.add_parser("profile", help="top functions of a py-spy --format raw file")
    prof.add_argument("file", type=Path)
    args = p.parse_args(argv)

    if args.cmd == "run":
        from bench.run import run

        only = [s.strip() for s in args.only.split(",") if s.strip()] or None
        path = run(args.quick, args.out, only, args.name, profile=args.profile, keep_workdir=args.keep_logs,
                   wait_quiet_s=args.wait_quiet, repeat=args.repeat, noise=args.noise)
        from bench.report import markdown

        results = json.loads(path.read_text())
        print(markdown(results))
        failed = [s for s, e in results["scenarios"].items() if e.get("error")]
        return 1 if failed else 0
    if args.cmd == "report":
        from bench.report import cases_markdown, markdown, plot

        results = json.loads(args.file.read_text())
        plot(results, args.file.parent, args.file.stem)
        print(markdown(results))
        print()
        print(cases_markdown(results))
        return 0
    from bench.profiles import print_summary

    print_summary(args.file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
