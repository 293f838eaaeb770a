"""bitplan's benchmarks (`bitplan bench NAME`, registered through the "bitplan.commands" entry
point by bench/cli.py): above every other package, and no part of the service."""
