"""``python -m dml.train``: train an image-retrieval embedding with a proxy-based loss, select it on
validation classes, and report it on test classes never seen in training.

The default run (no flags) trains the probabilistic EL-nivMF loss on the offline emoji benchmark with an
ImageNet EfficientNet-Lite0. On a CPU it trains the trunk's last stage and the embedding head on cached
activations of the trunk's frozen rest (it says so; ``--trunk frozen`` trains only the head); on a GPU it
fine-tunes the whole network.

Run directory (``--output-dir``): ``config.json`` (the effective configuration), ``history.jsonl`` (one
line per epoch), ``last.pt`` (everything needed to resume), ``best.pt`` (the validation-selected
weights), ``initial_metrics.json`` and ``final_metrics.json`` (test metrics of the selected checkpoint,
of the last epoch, and before training), ``report.md`` and ``NOTICE.txt`` (data attribution).

``--resume DIR`` continues an interrupted run exactly where it stopped (refused, in one line, if the
data or ``DIR/config.json`` changed since); ``--resume DIR --epochs N`` extends a run to N epochs.

Several GPUs: ``torchrun --standalone --nproc_per_node=N -m dml.train …`` trains with DDP (``--batch-size``
is then the global batch, split over the processes); see `dml.distributed`.

This module is only the command line: parse, run (`dml.run`), and turn failures into one line on
stderr and an exit status (`dml.runtime`).
"""

from __future__ import annotations

import contextlib
import sys
import traceback

from dml.config import ConfigError, parse_request
from dml.distributed import DistContext, env_rank, init_from_env
from dml.run import RunStart, start, train_run
from dml.runtime import (
    EXPECTED_ERRORS,
    Interrupted,
    configure_allocator,
    exit_status,
    install_stop_signals,
    one_line,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dml.train``; returns the process exit status.

    Failures are one line on stderr (no traceback): exit status 2 for usage errors, 1 for runtime
    failures (divergence, unreadable checkpoint, full or read-only disk), 130 after Ctrl-C and 143 after
    SIGTERM (both save ``last.pt`` first and print the command that resumes). Under torchrun an error that
    every process shares is printed once (by rank 0); an error of one process alone is printed by it
    with its rank.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.

    Raises:
        SystemExit: from argparse for ``--help`` (0) or a bad flag (2, one line).
    """
    configure_allocator()
    install_stop_signals()
    dist = DistContext()
    rank = env_rank()
    output_dir: str | None = None
    clean = False
    try:
        request = parse_request(argv)
        output_dir = str(request.resume or request.config.output_dir)  # type: ignore[union-attr]
        try:
            dist = init_from_env()
        except ValueError as err:
            raise ConfigError(str(err)) from None
        rank = dist.rank
        with contextlib.ExitStack() as stack:
            begin: RunStart = dist.on_main(lambda: start(request, stack))  # the run directory lives on rank 0
            train_run(begin, dist=dist)
        clean = True
        return 0
    except EXPECTED_ERRORS as err:
        shared = dist.is_shared(err)
        clean = shared or dist.world_size == 1  # every process stops here: leave the group normally
        if isinstance(err, KeyboardInterrupt):
            if rank == 0:
                print(_interrupted_line(err, output_dir, dist), file=sys.stderr)
        elif rank == 0:
            print(one_line(err), file=sys.stderr)
        elif not shared:
            print(f"[rank {rank}] {one_line(err)}", file=sys.stderr)
        return exit_status(err)
    finally:
        propagating = sys.exc_info()[1]
        if propagating is not None:  # an uncaught error's traceback would keep the trainer's frames alive
            traceback.clear_frames(propagating.__traceback__)
        dist.close(clean)


def _interrupted_line(err: KeyboardInterrupt, output_dir: str | None, dist: DistContext) -> str:
    from pathlib import Path

    name = f" ({signal_name})" if (signal_name := _signal_name(err)) else ""
    if output_dir is not None and (Path(output_dir) / "last.pt").exists():
        launcher = "torchrun … -m dml.train" if dist.world_size > 1 else "python -m dml.train"
        return f"\ninterrupted{name}: resume with  {launcher} --resume {output_dir}"
    return f"\ninterrupted{name} before the first checkpoint: run the same command again"


def _signal_name(err: KeyboardInterrupt) -> str:
    return str(err) if isinstance(err, Interrupted) else ""


if __name__ == "__main__":
    raise SystemExit(main())
