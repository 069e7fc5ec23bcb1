"""tga/__main__.py

`python -m tga ...` is the `tga` command, for environments where the console script is not on PATH.
"""

import sys

from tga.cli import main

if __name__ == "__main__":
    sys.exit(main())
