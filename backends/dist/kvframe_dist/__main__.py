"""``python -m kvframe_dist --role scheduler|server|worker`` starts one role from the environment
(DMLC_* / KVFRAME_* variables, as for MXNet). A worker role needs a command after ``--``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvframe_dist", description=__doc__)
    p.add_argument("--role", choices=["scheduler", "server", "worker"],
                   default=os.environ.get("KVFRAME_ROLE") or os.environ.get("DMLC_ROLE"))
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.role is None:
        p.error("give --role, or set DMLC_ROLE / KVFRAME_ROLE")
    os.environ["DMLC_ROLE"] = os.environ["KVFRAME_ROLE"] = args.role
    if args.role == "scheduler":
        from kvframe_dist.scheduler import main as run
        return run()
    if args.role == "server":
        from kvframe_dist.server import main as run
        return run()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("a worker needs a command: python -m kvframe_dist --role worker -- python train.py")
    os.execvp(cmd[0], cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
