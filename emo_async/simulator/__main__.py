"""``python -m emo_async.simulator``: run the simulator in its own process until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

import anyio

from ._config import FaultConfig, SimulatorConfig
from ._server import Simulator

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emo-async simulator",
        description="Run the DashScope EMO simulator on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (keep it loopback)")
    parser.add_argument("--port", type=int, default=8000, help="API port (0 = any free port)")
    parser.add_argument("--upload-port", type=int, default=0, help="upload host port")
    parser.add_argument("--media-port", type=int, default=0, help="media host port")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="real seconds per simulated second"
    )
    parser.add_argument("--max-running", type=int, default=10, help="account concurrency cap")
    parser.add_argument("--seed", type=int, default=0, help="seed of ids, timing and faults")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help="accepted Bearer key (repeatable; default sk-simulator)",
    )
    parser.add_argument("--submit-qps", type=float, default=5.0, help="submit rate limit")
    parser.add_argument("--task-qps", type=float, default=20.0, help="task query rate limit")
    parser.add_argument(
        "--no-validate", action="store_true", help="do not download and sniff the inputs"
    )
    parser.add_argument(
        "--media-mbps",
        type=float,
        default=None,
        help="bandwidth of each result download in Mbit/s (default: unlimited)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until interrupted; prints ``EMO_SIMULATOR base_url=... api_key=...``."""
    args = _parser().parse_args(argv)
    config = SimulatorConfig(
        api_keys=frozenset(args.api_keys or ["sk-simulator"]),
        time_scale=args.time_scale,
        max_running=args.max_running,
        seed=args.seed,
        submit_qps=args.submit_qps,
        task_qps=args.task_qps,
        validate_inputs=not args.no_validate,
        media_bandwidth=None if args.media_mbps is None else args.media_mbps * 125_000,
        faults=FaultConfig(seed=args.seed),
    )

    async def serve() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with Simulator(
                config,
                host=args.host,
                port=args.port,
                upload_port=args.upload_port,
                media_port=args.media_port,
            ) as sim:
                print(f"EMO_SIMULATOR base_url={sim.base_url} api_key={sim.api_key}", flush=True)
                async for _signum in signals:
                    break

    try:
        anyio.run(serve, backend="asyncio")
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"emo-async simulator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
