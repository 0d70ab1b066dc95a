"""``python -m kvframe_launch ...`` is ``kvframe-launch ...``."""

from __future__ import annotations

import sys

from kvframe_launch.launch import main

if __name__ == "__main__":
    sys.exit(main())
