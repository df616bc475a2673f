"""JupyterHub as `gpulab up` runs it: its clean-up stops things in the reverse order of start.

JupyterHub's own clean-up stops the managed services in the order they started (the pool,
then the worker), then users' servers.  A server's stop releases its vGPU through the pool,
so in that order every release finds the pool gone and the allocation stays booked after
the lab restarts; and the worker, still running, logs failed heartbeats to the stopped
pool.  This hub stops the servers, then the services last-started first, then lets
JupyterHub's clean-up do the rest (the proxy; the stopped parts are found stopped).
"""
from __future__ import annotations

import asyncio

from jupyterhub.app import JupyterHub


class GPULabHub(JupyterHub):
    async def cleanup(self):
        if self.cleanup_servers:
            stops = [user.stop(name) for user in self.users.values()
                     for name, spawner in list(user.spawners.items()) if spawner.active]
            if stops:
                self.log.info("Stopping %i single-user server(s) while the GPU pool still runs...", len(stops))
                for result in await asyncio.gather(*stops, return_exceptions=True):
                    if isinstance(result, Exception):
                        self.log.error("Failed to stop a server: %s", result)
        for service in reversed([s for s in self._service_map.values() if s.managed]):
            self.log.info("Stopping service %s", service.name)
            await service.stop()
        await super().cleanup()


if __name__ == "__main__":
    GPULabHub.launch_instance()
