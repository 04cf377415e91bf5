"""The `trellis` command: one entry point whose subcommands live beside the code they drive."""

from __future__ import annotations

import sys
from collections.abc import Callable


def _up(argv: list[str]) -> int:
    from shared.supervisor import cli_up

    return cli_up(argv)


def _import_gguf(argv: list[str]) -> int:
    from shared.default_model import cli_import_gguf

    return cli_import_gguf(argv)


def _inspect(argv: list[str]) -> int:
    from shared.exl3_cli import cli_inspect

    return cli_inspect(argv)


def _dequant(argv: list[str]) -> int:
    from shared.exl3_cli import cli_dequant

    return cli_dequant(argv)


def _synth(argv: list[str]) -> int:
    from shared.exl3_cli import cli_synth

    return cli_synth(argv)


def _convert(argv: list[str]) -> int:
    from converter_worker.cli import cli_convert

    return cli_convert(argv)


def _eval(argv: list[str]) -> int:
    from converter_worker.cli import cli_eval

    return cli_eval(argv)


def _gateway(argv: list[str]) -> int:
    from gateway.__main__ import main

    return main(argv)


def _worker(argv: list[str]) -> int:
    from inference_worker.__main__ import main

    return main(argv)


def _converter(argv: list[str]) -> int:
    from converter_worker.__main__ import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "up": (_up, "run the whole suite locally: Redis, gateway, an inference worker, a converter worker"),
    "import-gguf": (_import_gguf, "turn a GGUF file into a Hugging Face style model directory"),
    "inspect": (_inspect, "describe a model directory: architecture, per-tensor bits and codebook, sizes"),
    "dequant": (_dequant, "write the dense fp16 weight of one EXL3 linear"),
    "synth": (_synth, "write a synthetic EXL3 model with random codes (for benchmarks)"),
    "convert": (_convert, "quantize a model directory or GGUF file to EXL3 (resumable: -r)"),
    "eval": (_eval, "perplexity, KL divergence and top-1 agreement of a model against a reference"),
    "gateway": (_gateway, "run the HTTP gateway alone"),
    "worker": (_worker, "run one inference worker alone"),
    "converter": (_converter, "run one converter worker alone"),
}


def usage() -> str:
    lines = ["usage: trellis COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"trellis: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
