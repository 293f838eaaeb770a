"""The job stages: each loads what it needs by id, calls compressor/solver, and stores the
outcome. service.jobs.registry names them; the runner imports one when it first runs it."""
