"""torch.compile on the generator's UNet: the steady-state gain and the one-off compile cost.

Work: the stock ``StableUnCLIPImg2ImgPipeline`` on one batch of image-conditioned generations
(``--batch-size`` real images, DDIM ``--steps``, guidance 4), eager UNet against the UNet compiled
as ``genaug synth --compile`` compiles it (``compile_unet``: static shapes, inductor). Printed: the
compile time (first compiled call minus an eager call; cold unless inductor's cache already holds
these graphs: pass a fresh ``--inductor-cache`` folder for a cold number), the median eager and
compiled call over alternating repeats, their ratio, and the largest pixel difference.

    python benchmarks/unet_compile.py --batch-size 24 --steps 25 --repeats 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--real-data", default="worlds/default/bench")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inductor-cache", default=None, help="inductor cache folder (default: a fresh one)")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or tempfile.mkdtemp(prefix="inductor-")

    import numpy as np
    import torch

    from genaug.artefacts import read_dataset
    from genaug.models.loading import compile_unet, default_resolution, load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu")
    size = default_resolution(pipe)
    ds = read_dataset(args.real_data)
    images = [ds.image(i).resize((size, size)) for i in range(args.batch_size)]
    names = [ds.class_names[int(r["label"])] for r in ds.records[:args.batch_size]]

    def call() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = pipe(image=images, prompt=[f"a photo of a {n}" for n in names], num_inference_steps=args.steps,
                   guidance_scale=4.0, noise_level=0, output_type="np",
                   generator=[torch.Generator().manual_seed(i) for i in range(args.batch_size)]).images
        return time.perf_counter() - t0, out

    call()  # warm-up: allocator, thread pools
    eager_forward = pipe.unet.forward
    eager_first, reference = call()
    compile_unet(pipe)
    compiled_forward = pipe.unet.forward
    compiled_first, out = call()
    eager, compiled = [], []
    for _ in range(args.repeats):
        pipe.unet.forward = eager_forward
        eager.append(call()[0])
        pipe.unet.forward = compiled_forward
        compiled.append(call()[0])
    e, c = statistics.median(eager), statistics.median(compiled)
    report = {
        "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
        "compile_seconds": round(compiled_first - eager_first, 1),
        "eager_call_seconds": round(e, 3), "compiled_call_seconds": round(c, 3),
        "compiled_vs_eager": round(e / c, 2),
        "break_even_images": round((compiled_first - eager_first) / (e - c) * args.batch_size) if e > c else None,
        "max_pixel_difference": round(float(np.abs(out - reference).max() * 255), 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
