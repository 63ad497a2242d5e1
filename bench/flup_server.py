"""flup's prefork FastCGI server with N children, for the benchmark."""

import sys

from flup.server.fcgi_fork import WSGIServer

sys.path.insert(0, sys.argv[2])
from hello_app import application  # noqa: E402

n = int(sys.argv[3])
WSGIServer(
    application, bindAddress=sys.argv[1], minSpare=n, maxSpare=n, maxChildren=n, maxRequests=0
).run()
