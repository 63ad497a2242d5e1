"""The serving side: runs only in generation and worker processes, never in the master.

App loader, WSGI environ, wsgi.input, one request through the app, the worker loop and the
generation that imports the app once and forks the workers.
"""
