"""`make bench`: run every benchmark, print one table, write data/bench.json.

Each part measures its own baseline in the same run (raw sqlite3 for billing, a trivial Flask
endpoint for the webhook), so the ratios mean something on a noisy machine. Figures are
printed, never asserted. `python -m bench --quick` runs shorter measurements.
"""
import argparse
import importlib
import json
import os
import sys
import time
import traceback

PARTS = ("bench.bench_billing", "bench.bench_webhook", "bench.bench_pipeline", "bench.bench_bot",
         "bench.bench_growth", "bench.bench_scaleout")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="run one part: billing, webhook, pipeline, bot or growth")
    parser.add_argument("--out", default=os.path.join("data", "bench.json"))
    args = parser.parse_args(argv)
    figures: dict = {}
    for name in PARTS:
        if args.only and not name.endswith(args.only):
            continue
        started = time.monotonic()
        try:
            module = importlib.import_module(name)
            result = module.run(quick=args.quick)
        except Exception as exc:  # one broken part must not hide the others' figures
            traceback.print_exc()
            result = {"%s_error" % name.rsplit("_", 1)[-1]: "%s: %s" % (type(exc).__name__, exc)}
        figures.update(result)
        print("%s: %.1f s" % (name, time.monotonic() - started), file=sys.stderr)
    width = max((len(k) for k in figures), default=10)
    print("%-*s  %s" % (width, "figure", "value"))
    for key in sorted(figures):
        value = figures[key]
        shown = "%.3f" % value if isinstance(value, float) else str(value)
        print("%-*s  %s" % (width, key, shown))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(figures, fh, indent=2, sort_keys=True, default=str)
    print("written: %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
