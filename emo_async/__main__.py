"""``python -m emo_async``: the command line."""

from ._cli import main

raise SystemExit(main())
