"""fcgi-engine: a FastCGI application engine and process manager for Python web apps."""

__version__ = "0.1.0"
