"""Connectors: the only code that knows an SSH library (asyncssh by default, paramiko via fabric).

Everything else talks to the :class:`~fleetprobe.session.Session` protocol.
"""
