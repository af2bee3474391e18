"""A worker process for one rank (ranks 1..N-1 of the local launcher).

    python -m kiln.launch.worker ENGINE --rank R --world-size N --master-port P [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kiln-worker")
    ap.add_argument("engine")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--master-addr", default="127.0.0.1")
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--local-rank", type=int, default=None)
    a = ap.parse_args(argv)
    from kiln.runtime.worker import Worker

    try:
        w = Worker(a.engine, a.rank, a.world_size, a.master_addr, a.master_port, a.device, a.local_rank)
    except Exception as e:
        print(f"kiln worker {a.rank}: error: {e}", file=sys.stderr)
        return 1
    w.handshake(None, 1, 1, [], None)  # the real values come from rank 0's broadcast
    w.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
