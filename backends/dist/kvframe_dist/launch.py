"""``python -m kvframe_dist.launch``: kept for scripts and docs that use it; the launcher itself is
the distribution ``kvframe-launch`` (package ``kvframe_launch``, command ``kvframe-launch``), which
the multi-process stores share.  Running this module runs :func:`kvframe_launch.launch.main`, and
its other names are :mod:`kvframe_launch.launch`'s."""

from __future__ import annotations

import sys
from typing import Any

from kvframe_launch import launch as _launch
from kvframe_launch.launch import main

__all__ = ["main"]


def __getattr__(name: str) -> Any:  # the old module's names: kvframe_dist.launch.build, .parse_args, ...
    return getattr(_launch, name)


if __name__ == "__main__":
    sys.exit(main())
