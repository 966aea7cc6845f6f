"""pytest plugin for applications that use outbox (entry point ``pytest11``).

Fixtures are added by the broker work (issue 3).
"""
