"""Test-only driver: install a bundle and SIGKILL this process when the installer passes one named step
(``term:STEP``: SIGTERM instead, with the handler ``fieldpack install`` installs).

``python -m tests.device.install_crash_driver STEP --data-dir D BUNDLE [--progress]``. A power cut, as the data
dir sees it, at a chosen point; the product's installer only reports its steps (``on_step``), it has no
fault-injection switch of its own. An unknown STEP never fires (the install completes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from fieldpack.device.install import install_bundle, stop_on_sigterm
from fieldpack.shared.errors import FieldpackError


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("step")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    term = args.step.startswith("term:")  # "term:STEP": SIGTERM at STEP, handled as `fieldpack install` does
    if term:
        stop_on_sigterm()

    def on_step(name: str) -> None:
        if name == args.step.removeprefix("term:"):
            logging.shutdown()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGTERM if term else signal.SIGKILL)

    def progress(phase: str, done: int, total: int) -> None:
        print(f"progress {phase} {done} {total}", flush=True)

    try:
        result = install_bundle(args.bundle, args.data_dir, check=None, on_step=on_step,
                                on_progress=progress if args.progress else None,
                                allow_downgrade=True)  # crash tests alternate versions both ways
    except FieldpackError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    print(result.message, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
