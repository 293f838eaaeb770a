"""Jobs: the queue interface, the job state machine, and the runner that executes stages."""
