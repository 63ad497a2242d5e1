"""`python -m fcgi_engine` runs the command-line interface."""

from fcgi_engine.cli import main

raise SystemExit(main())
