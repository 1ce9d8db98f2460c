"""The user side of a container shell: ``crunchgate connect-ssh`` and ``crunchgate shell``."""
