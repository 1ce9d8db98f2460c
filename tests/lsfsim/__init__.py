"""LSF simulator (bsub/bjobs/bkill) for tests; see sim.py."""
