"""cote's Monitor example: the `top` of the mesh (same as `python -m transport monitor`)."""
import sys

from transport.__main__ import main

sys.exit(main(["monitor", *sys.argv[1:]]))
