"""tga/__main__.py

`python -m tga ...` is the `tga` command (the demo's parallel phases start their commands this way, with the same
interpreter as the parent).
"""

import sys

from tga.cli import main

if __name__ == "__main__":
    sys.exit(main())
