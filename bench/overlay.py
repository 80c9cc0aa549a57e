"""The bounded-degree overlay, simulated: does it settle, and what does forming it cost?

    .venv/bin/python bench/overlay.py [--sizes 10 25 50 100 1000] [--dial-delay 0.5 3]
        [--publish-lag 2] [--spread 0] [--loss 0] [--seeds 1 2 3] [--settle 30] [--quiet 300]

One JSON line per (N, seed) from :class:`kairos_testing.overlaysim.Overlay`: the real
:class:`~kairos_core.connections.ConnectionManager` of every node, called once per simulated
second, over a model of dials (``--dial-delay`` seconds, uniform), trims with the trim notice's
hold, published degrees that lag (``--publish-lag``), staggered starts (``--spread``) and random
losses per connection per second (``--loss``). Fields: ``formation_s`` (every node at ``low`` or
N − 1, one piece), ``changes_until_quiet`` (dials + trims + losses until the quiet window: each
is a rewrite of two ``nodes`` entries every node receives), ``quiet_changes_per_s`` over the
window after ``--settle``, the degrees, ``one_piece``, and the wall time of the simulation. It
takes one process and seconds (N = 1,000: about a minute); it says nothing about CPU or bytes,
which only ``bench/scale.py`` measures, with real processes.
"""

from __future__ import annotations

import argparse
import json
import time

from kairos_testing.overlaysim import Overlay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--low", type=int, default=8)
    parser.add_argument("--high", type=int, default=16)
    parser.add_argument("--dial-delay", type=float, nargs=2, default=[0.5, 3.0], metavar=("MIN", "MAX"))
    parser.add_argument("--publish-lag", type=float, default=2.0)
    parser.add_argument("--spread", type=float, default=0.0, help="nodes start within this many seconds")
    parser.add_argument("--loss", type=float, default=0.0, help="chance a connection is lost, per second")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--quiet", type=float, default=300.0)
    args = parser.parse_args()
    for n in args.sizes:
        for seed in args.seeds:
            started = time.perf_counter()
            overlay = Overlay(
                n,
                low=args.low,
                high=args.high,
                dial_delay=(args.dial_delay[0], args.dial_delay[1]),
                publish_lag=args.publish_lag,
                start_spread=args.spread,
                loss_per_s=args.loss,
                seed=seed,
            )
            report = overlay.run(settle=args.settle, quiet=args.quiet)
            report.update(
                seed=seed,
                dial_delay_s=args.dial_delay,
                publish_lag_s=args.publish_lag,
                start_spread_s=args.spread,
                loss_per_connection_per_s=args.loss,
                wall_s=round(time.perf_counter() - started, 2),
            )
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
