"""Fleet rollouts over MQTT: push a signed bundle to a group of devices, staged, resumable, with rollback.

Modules, one job each::

    agent     FleetAgent: the device side inside ``fieldpack serve`` (desired record -> chunks -> install ->
              health check -> healthy / rolled back), reported retained on the device's fleet state topic
    staging   ChunkStore: chunks staged at their offsets on disk, logged with their sha256, resumable
    pusher    Rollout (``fleet push``: desired record, chunk server with a rate limit, canary and waves),
              read_fleet (``fleet status``), abort_rollout (``fleet abort``)

Topics and payloads live in :mod:`shared.fleet_protocol` only.
"""

from fieldpack.device.fleet.agent import FleetAgent, fleet_agent_for
from fieldpack.device.fleet.pusher import Rollout, RolloutResult, abort_rollout, read_fleet

__all__ = ["FleetAgent", "Rollout", "RolloutResult", "abort_rollout", "fleet_agent_for", "read_fleet"]
