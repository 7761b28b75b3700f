"""``python -m rmae …`` (and ``torchrun -m rmae …``) is the ``rmae`` command."""

from .cli import main

raise SystemExit(main())
