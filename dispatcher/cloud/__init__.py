"""``crunchgate dispatch-cloud``: the cloud VM backend (drop-in for arvados-dispatch-cloud).

Modules: :mod:`.queue` (container cache, reference 5.3), :mod:`.scheduler` (5.5),
:mod:`.pool` and :mod:`.worker` (5.6-5.7), :mod:`.sshexec` (5.8), :mod:`.drivers` (5.10-5.11:
loopback, ec2, azure, stub), :mod:`.throttle`, :mod:`.mgmt` (5.12), :mod:`.metrics` (5.13),
:mod:`.dispatcher` (the service wiring), :mod:`.cli`. See ``docs/cloud.md``.
"""
