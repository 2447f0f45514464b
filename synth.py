#!/usr/bin/env python
"""Generate a synthetic training set; the same as `genaug synth`.

    python synth.py --model models/tiny-sd15 --class-names "red circle,blue square" --images-per-class 4 \
        --output datasets/synth-demo
    python synth.py --config my_synth.yaml --seed 1      # a config file, overridden by flags
"""

import sys

from genaug.cli import parse_command_args, run_command


def parse_args(input_args=None):
    return parse_command_args("synth", input_args, prog="synth.py")


def main(args):
    return run_command("synth", args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
