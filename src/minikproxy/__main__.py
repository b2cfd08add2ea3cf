"""``python -m minikproxy``."""

from minikproxy.cli import main

raise SystemExit(main())
