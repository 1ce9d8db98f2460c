"""crunchgate: HPC batch-submission gateway for Arvados containers."""
