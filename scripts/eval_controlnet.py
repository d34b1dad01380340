"""Measure how well a ControlNet places objects on the tiny model: IoU with the condition vs a blank one.

    .venv/bin/python scripts/eval_controlnet.py --controlnet outputs/controlnet_canny/<run>/controlnet

Draws `--samples` fresh scenes (not the training set: another seed), turns each into its canny edges,
samples `a <colour> <shape>` with the edges and with a blank conditioning image (same seeds), and
prints the mean intersection-over-union of the sampled object with the scene's object.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: never reach the network

from types import SimpleNamespace  # noqa: E402

from diffusers import StableDiffusionControlNetPipeline  # noqa: E402

from finetune.data.conditioning import canny  # noqa: E402
from finetune.export.controlnet_file import read_controlnet  # noqa: E402
from finetune.tiny.control_metrics import control_scenes, placement_iou  # noqa: E402
from finetune.validation.samples import sampler_from  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/tiny-sd")
    parser.add_argument("--controlnet", required=True, help="ControlNet folder or .safetensors file")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=1000, help="scenes and samples (training used others)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        args.model,
        controlnet=read_controlnet(args.controlnet),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = sampler_from(pipe.scheduler, "euler")
    pipe.set_progress_bar_config(disable=True)
    thresholds = SimpleNamespace(canny_low=100, canny_high=200)
    scenes = control_scenes(args.samples, args.seed)
    result = placement_iou(
        pipe,
        scenes,
        lambda scene: canny(scene, thresholds),
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result))
        return
    print(f"object placement (mean IoU over {args.samples} fresh scenes):")
    print(f"  with the canny condition: {result['with_condition']:.3f}")
    print(f"  with a blank condition:   {result['blank_condition']:.3f}")


if __name__ == "__main__":
    main()
