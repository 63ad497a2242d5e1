"""POSIX plumbing with no protocol and no app: sockets, pidfiles, process identity."""
