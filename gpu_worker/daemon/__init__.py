"""The worker daemon: accepts sessions, forks one executor per session, runs their calls on a
backend, reports to the pool. `python -m gpu_worker.daemon` is `gpulab worker`."""
