"""``python -m emo_async.simulator``: run the simulator in its own process until SIGINT/SIGTERM.

The accepted key comes from the environment (``EMO_SIM_API_KEY``) or a file, never from the
command line (any user of the machine can read a command line in ``ps``), and is never printed:
the announce line says only where it was configured.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Final

import anyio

from ._config import FaultConfig, SimulatorConfig
from ._server import Simulator

__all__ = ["KEY_ENV", "main"]

#: The environment variable holding the accepted key(s), comma-separated.
KEY_ENV: Final = "EMO_SIM_API_KEY"
_DEFAULT_KEY: Final = "sk-simulator"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emo-async simulator",
        description="Run the DashScope EMO simulator on loopback.",
        allow_abbrev=False,
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
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help=f"file of accepted Bearer keys, one a line (default: ${KEY_ENV}, comma-separated,"
        f" else {_DEFAULT_KEY}); a key is never taken on the command line",
    )
    # Caught to refuse it without echoing the key (argparse would repeat it in its message).
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
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


def _keys(args: argparse.Namespace) -> tuple[frozenset[str], str]:
    """The accepted keys, and where they were configured (what the announce line names)."""
    if args.api_key_file is not None:
        try:
            text = args.api_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise SystemExit(
                f"emo-async simulator: --api-key-file {args.api_key_file}: {exc.strerror or exc}"
            ) from None
        keys = frozenset(k.strip() for k in text.splitlines() if k.strip())
        if not keys:
            raise SystemExit(f"emo-async simulator: --api-key-file {args.api_key_file} is empty")
        return keys, f"file:{args.api_key_file}"
    from_env = frozenset(k.strip() for k in os.environ.get(KEY_ENV, "").split(",") if k.strip())
    if from_env:
        return from_env, f"env:{KEY_ENV}"
    return frozenset({_DEFAULT_KEY}), "default"


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until interrupted; prints ``EMO_SIMULATOR base_url=...
    api_key_from=...`` (``env:EMO_SIM_API_KEY``, ``file:PATH`` or ``default``, which is
    ``sk-simulator``): where the key is configured, never the key."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.api_key is not None:
        parser.error(
            f"--api-key is not accepted (a command line shows in ps): set {KEY_ENV} or use"
            " --api-key-file"
        )
    keys, key_from = _keys(args)
    config = SimulatorConfig(
        api_keys=keys,
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
                print(f"EMO_SIMULATOR base_url={sim.base_url} api_key_from={key_from}", flush=True)
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
