"""The master: owns the socket and the pidfile, boots generations, never imports app code.

`policy` decides (pure: events in, actions out); `loop` carries the actions out and turns OS
happenings into events; `run` sets it all up for `fcgi-engine serve`.
"""
