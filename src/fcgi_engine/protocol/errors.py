"""The protocol's one error type."""


class ProtocolError(Exception):
    """The peer broke the FastCGI protocol; the connection cannot go on and must be closed.

    Whatever the specification says to answer first (if anything) has already been queued on the
    connection: send `Connection.data_to_send()` before closing.
    """
