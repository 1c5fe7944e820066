"""The ``jsample`` command: ``demo`` samples text from the bundled model, ``bench`` times samplers.

Bad input exits with status 2 and a one-line message on stderr, never a traceback::

    $ jsample demo --top-p 2
    jsample demo: error: argument --top-p: must be a number in [0, 1], got 2.0

Compiling the decode loop takes most of a cold start, so ``demo`` keeps JAX's persistent
compilation cache in ``$JSAMPLE_CACHE_DIR`` (default ``~/.cache/jsample/xla``; an empty value
turns it off) unless JAX already has a cache directory configured. Later runs start in seconds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Sequence

DEFAULT_PROMPT = "The return value of "


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage block first
        raise UsageError(f"{self.prog}: error: {message}")


def _number(kind: type, low: float, high: float, text: str) -> Callable[[str], float]:
    """An argparse type accepting ``kind`` values in ``[low, high]``; ``text`` describes them."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {text}, got {value!r}") from None
        if not (low <= number <= high) or (kind is float and not math.isfinite(number)):
            raise argparse.ArgumentTypeError(f"must be {text}, got {number!r}")
        return number

    return parse


def _parser() -> _Parser:
    parser = _Parser(prog="jsample",
                     description="jsample: exact, jit-compiled token sampling for JAX.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser(
        "demo", help="continue a prompt with the bundled byte-level Flax model",
        description="Continue a prompt with the byte-level Flax NNX model bundled with jsample "
                    "(trained on the Python language reference). The same seed prints the same "
                    "text.")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT",
                      help="text to continue (default: %(default)r)")
    demo.add_argument("--seed", type=_number(int, 0, 2**32 - 1, "an integer in [0, 2**32)"),
                      default=0, metavar="N", help="PRNG seed (default: %(default)s)")
    demo.add_argument("--temperature", type=_number(float, 0, math.inf, "a finite number >= 0"),
                      default=0.8, metavar="T", help="0 means greedy (default: %(default)s)")
    demo.add_argument("--top-k", type=_number(int, 0, 2**31 - 1, "an integer >= 0"),
                      default=40, metavar="K", help="0 means off (default: %(default)s)")
    demo.add_argument("--top-p", type=_number(float, 0, 1, "a number in [0, 1]"),
                      default=0.9, metavar="P", help="1 means off (default: %(default)s)")
    demo.add_argument("--min-p", type=_number(float, 0, 1, "a number in [0, 1]"),
                      default=0.0, metavar="M", help="0 means off (default: %(default)s)")
    demo.add_argument("--top-p-rule", choices=("inclusive", "exclusive"), default="inclusive",
                      help="keep (inclusive) or drop (exclusive) the token that crosses top-p")
    demo.add_argument("--max-new-tokens",
                      type=_number(int, 0, 100_000, "an integer in [0, 100000]"), default=200,
                      metavar="N", help="bytes to generate (default: %(default)s)")
    demo.add_argument("--num-samples", type=_number(int, 1, 1024, "an integer in [1, 1024]"),
                      default=1, metavar="N", help="continuations decoded together as one batch; sample i "
                                      "uses fold_in(key(seed), i) (default: %(default)s)")

    commands.add_parser(
        "bench", add_help=False, help="run the benchmark suite (arguments go to it; try --help)")
    return parser


def _use_compilation_cache() -> None:
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "jsample", "xla")
    path = os.environ.get("JSAMPLE_CACHE_DIR", default)
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _demo(args: argparse.Namespace) -> None:
    import jax

    import jsample as js
    from jsample.model import generate, load

    _use_compilation_cache()
    try:
        size = len(args.prompt.encode("utf-8"))
    except UnicodeEncodeError:
        raise UsageError("jsample demo: error: --prompt is not valid UTF-8") from None
    model = load()
    if size > model.config.window:
        raise UsageError(f"jsample demo: error: --prompt is {size} bytes; the model reads at "
                         f"most {model.config.window}")
    params = js.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               min_p=args.min_p, top_p_rule=args.top_p_rule)
    texts, _ = generate(model, [args.prompt] * args.num_samples, jax.random.key(args.seed), params,
                        max_new_tokens=args.max_new_tokens)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(args.prompt + text)


def _bench(argv: list[str]) -> int:
    from jsample import benchmark  # imported on demand: it pulls in tqdm and the peers

    return int(benchmark.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:
            # Everything after ``bench`` belongs to the benchmark's own parser.
            return _bench(argv[1:])
        args = _parser().parse_args(argv)
        _demo(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    return 0
