"""tga/demo/phase_commands.py

`python -m tga.demo.phase_commands COMMANDS_JSON`: runs the `tga` commands of one phase (a JSON list of argv lists)
one after the other in this process, as `tga demo --jobs N` does for each phase it runs beside others. One process per
phase, not per command: the interpreter start-up and the imports (about 12 s on 2 busy cores) are paid once, which
matters for the evaluation phases of six commands each.
"""

from __future__ import annotations

import json
import sys

from tga.demo.phases import shell_line


def run_commands(commands: list[list[str]]) -> int:
    """Run each command through `tga.cli.main`; stop at the first that fails and return its exit status."""
    from tga.cli import main

    for argv in commands:
        print(f"$ {shell_line(argv)}", flush=True)
        try:
            status = main(list(argv))
        except SystemExit as stop:  # argparse exits on a bad flag
            status = stop.code if isinstance(stop.code, int) else 1
        if status != 0:
            print(f"failed with exit status {status}: {shell_line(argv)}", flush=True)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(run_commands(json.loads(sys.argv[1])))
