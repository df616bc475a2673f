"""The GPU pool: a JupyterHub service that registers workers, places vGPUs on their GPUs
(scheduler.py), keeps allocations in a database (db.py) and shows them to admins."""
