"""What the master execs to boot a generation: `python -m fcgi_engine.serving`."""

from fcgi_engine.serving.generation import main

raise SystemExit(main())
