"""`python tests/slow_cli.py SECONDS ARGS...`: the latentpatch CLI with a pause after each encoded batch, so a
test can SIGKILL a real encode mid-run (the library itself carries no test hooks)."""

import sys
import time

from latentpatch.encoding import encode as encoding
from latentpatch.cli.app import main

_encode_batch = encoding._encode_batch


def _slow_encode_batch(*args, **kwargs):
    out = _encode_batch(*args, **kwargs)
    time.sleep(PAUSE)
    return out


if __name__ == "__main__":
    PAUSE = float(sys.argv[1])
    encoding._encode_batch = _slow_encode_batch
    sys.argv = ["latentpatch", *sys.argv[2:]]
    main()
