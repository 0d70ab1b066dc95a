"""``python -m kvframe``: the ``kvframe`` command (see kvframe.cli), for when the console script is not
on PATH or a particular interpreter's kvframe is wanted."""

import sys

from kvframe.cli import main

if __name__ == "__main__":
    sys.exit(main())
