"""The simulator in its own process, dumping its ledger when it stops.

``python -m benchmarks._sim_proc --config '{"time_scale": 0.1, ...}' --dump ledger.json``
starts :class:`emo_async.simulator.Simulator` with a :class:`SimulatorConfig` built from the
JSON (any field; ``null`` rates mean unlimited; ``faults`` is a JSON object of
:class:`FaultConfig` fields, e.g. ``{"latency": 0.15}``), prints the same
``EMO_SIMULATOR base_url=... api_key=...`` line as ``python -m emo_async.simulator``, and serves
until SIGTERM/SIGINT or EOF on stdin. Then it writes what its ledger saw to ``--dump``:

* ``requests``: parallel arrays ``t`` (``time.monotonic()`` of arrival: the clock is
  system-wide on Linux, so other processes can compare it with theirs), ``endpoint`` and
  ``status`` (null when the connection was dropped);
* ``tasks``: every task created, with real monotonic times ``created``, ``started`` and
  ``ended`` (end of processing, whether or not anyone asked), ``duration`` in real seconds,
  the audio duration and the final status;
* ``duplicate_tasks``: input fingerprint → task ids, for inputs billed more than once;
* ``max_running_observed`` and the ``time_scale``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from emo_async.simulator import FaultConfig, Simulator, SimulatorConfig


def _config(raw: str) -> SimulatorConfig:
    fields: dict[str, Any] = json.loads(raw) if raw else {}
    if "faults" in fields:
        fields["faults"] = FaultConfig(**fields["faults"])
    if "api_keys" in fields:
        fields["api_keys"] = frozenset(fields["api_keys"])
    return SimulatorConfig(**fields)


def dump(sim: Simulator, path: Path) -> None:
    """Write the ledger (requests and tasks) to ``path`` as JSON."""
    scale = sim.config.time_scale
    now_real = time.monotonic()
    now_sim = sim.clock.now()

    def real(sim_t: float | None) -> float | None:
        # Valid as long as nobody jumped the clock (the benchmarks never do).
        return None if sim_t is None else now_real - (now_sim - sim_t) * scale

    ledger = sim.ledger
    created_at = {rec.task_id: rec.created_at for rec in ledger.tasks_created}
    tasks = []
    for task_id, snap in sim.tasks.items():
        end = None
        if snap.scheduled is not None:
            end = snap.scheduled + snap.processing_seconds
        if snap.ended is not None:
            end = snap.ended
        try:
            # What the media host serves for it: the benchmarks check files byte for byte.
            digest: str | None = hashlib.sha256(sim.result_bytes(task_id)).hexdigest()
        except KeyError:
            digest = None
        tasks.append(
            {
                "sha256": digest,
                "id": task_id,
                "created": created_at.get(task_id, real(snap.submitted)),
                "started": real(snap.scheduled),
                "ended": real(end),
                "duration": snap.processing_seconds * scale,
                "audio": snap.audio_duration,
                "status": snap.status,
            }
        )
    requests = ledger.requests
    body = {
        "time_scale": scale,
        "max_running_observed": ledger.max_running_observed,
        "duplicate_tasks": ledger.duplicate_tasks(),
        "requests": {
            "t": [r.t for r in requests],
            "endpoint": [r.endpoint for r in requests],
            "status": [r.status for r in requests],
            "path": [r.path for r in requests],
        },
        "tasks": tasks,
    }
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(body, separators=(",", ":")))
    part.replace(path)


async def serve(config: SimulatorConfig, dump_path: Path | None) -> None:
    # Ignored outside the receiver below: a second signal while stopping (or the first one
    # after the receiver is gone) must not kill the process before the dump is written.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    async with Simulator(config) as sim:
        print(f"EMO_SIMULATOR base_url={sim.base_url} api_key={sim.api_key}", flush=True)
        async with anyio.create_task_group() as tg:
            token = anyio.lowlevel.current_token()

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                tg.cancel_scope.cancel()

            def on_eof() -> None:
                # EOF on stdin (the parent went away) stops us like a signal. A daemon
                # thread, so a stdin that never closes cannot hold the interpreter at exit.
                sys.stdin.read()
                with contextlib.suppress(RuntimeError):
                    anyio.from_thread.run_sync(tg.cancel_scope.cancel, token=token)

            tg.start_soon(on_signal)
            threading.Thread(target=on_eof, daemon=True).start()
    if dump_path is not None:
        dump(sim, dump_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._sim_proc")
    parser.add_argument("--config", default="{}", help="SimulatorConfig fields as JSON")
    parser.add_argument("--dump", type=Path, default=None, help="write the ledger here on exit")
    args = parser.parse_args(argv)
    anyio.run(serve, _config(args.config), args.dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
