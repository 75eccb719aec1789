"""The `dinat` command: train, validate, flops, bench.

dinat train [-c configs/NAME.yml] DATA_DIR [--overrides]
dinat validate --model NAME (--pretrained | --checkpoint FILE) DATA_DIR
dinat flops --model NAME [NAME ...] [--img-size N] [--fvcore-extras]
dinat bench [...]
"""

from __future__ import annotations

import sys

USAGE = __doc__


def _flops(argv) -> None:
    from . import flops
    from .config import ArgumentParser, check_model_name

    parser = ArgumentParser(prog="dinat flops", description="parameters and FLOPs (fvcore, 1 MAC = 1 FLOP)")
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--img-size", type=int, help="default: each model's pretrained-cfg size (384 for *_384)")
    parser.add_argument(
        "--fvcore-extras",
        action="store_true",
        help="also count LayerNorm and the rpb add (the release's published 384 px figures)",
    )
    args = parser.parse_args(argv)
    size = None if args.img_size is None else (3, args.img_size, args.img_size)
    try:  # checks the names and the size before counting anything
        for name in args.model:
            check_model_name(name)
        rows = flops.main_table(args.model, size, count_norms=args.fvcore_extras, count_bias=args.fvcore_extras)
    except ValueError as error:
        parser.error(str(error))
    print(f"{'model':<28} {'size':>9} {'params (M)':>11} {'GFLOPs':>9}")
    for name, params, gflops, (_, height, width) in rows:
        print(f"{name:<28} {f'{height}x{width}':>9} {params:>11.2f} {gflops:>9.2f}")


def _bench(argv) -> None:
    from . import bench

    bench.main(argv)


def _train(argv) -> None:
    from .train import main

    main(argv)


def _validate(argv) -> None:
    from .validate import main

    main(argv)


COMMANDS = {"train": _train, "validate": _validate, "flops": _flops, "bench": _bench}


def main(argv=None) -> int:
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:  # usage on stderr, as for any error
        if argv:
            print(f"error: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(USAGE.strip(), file=sys.stderr)
        return 2
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError, CheckpointError, OSError) as e:  # OSError: a path that cannot be used
        print(f"error: {_own_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written atomically, the last one is whole
        print(f"interrupted: {argv[0]} stopped", file=sys.stderr)
        return 130  # as a shell reports a process ended by SIGINT
    return 0


def _own_message(error: Exception) -> str:
    """The error's message; for one raised in a DataLoader worker (torch re-raises it with the
    worker's whole traceback as its message), the last line of that, without the error's name."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.partition(": ")[2] or last


if __name__ == "__main__":
    sys.exit(main())
