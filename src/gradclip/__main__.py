"""``python -m gradclip``: the command line (also ``torchrun -m gradclip sweep ...``)."""

from gradclip.cli import main

raise SystemExit(main())
