#!/usr/bin/env python
"""DreamBooth-LoRA training; the same as `genaug train-lora`.

    python train_lora.py --model models/tiny-sd15 --instance-data worlds/default/novel/star-shape \
        --instance-prompt "a photo of sks star" --output adapters/star --max-train-steps 200
    # several GPUs:  accelerate launch train_lora.py --config lora.yaml
"""

import sys

from genaug.cli import parse_command_args, run_command


def parse_args(input_args=None):
    return parse_command_args("train-lora", input_args, prog="train_lora.py")


def main(args):
    return run_command("train-lora", args)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
