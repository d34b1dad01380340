"""Does prior preservation keep the class prompt where the base model had it? Two LoRA runs on the
bundled style set (experiment=tiny_style), one with DreamBooth class images and one without, then the
class prompt sampled by the base model and by each LoRA with the same seeds.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/eval_prior.py --out /tmp/prior [--steps 300]

Printed, for each run (JSON): `drift`, the mean absolute pixel difference (0-255) from the base model's
samples of the class prompt, and `style_leak`, how far those samples moved towards the style set
(`finetune.tiny.metrics.style_strength`: 0 = not at all, 1 = all the way). The class prompt is a
caption of the style set without its trigger words, so a run that keeps its prior draws it as before.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: never reach the network

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402

from finetune.config.store import CONF_DIR  # noqa: E402
from finetune.tiny.metrics import style_strength  # noqa: E402
from finetune.train import train  # noqa: E402
from finetune.validation.samples import sampler_from  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="a new folder for the runs and class images")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--class-prompt", default="a red circle")
    parser.add_argument("--class-images", type=int, default=16)
    parser.add_argument("--samples", type=int, default=16, help="class-prompt samples per model")
    args = parser.parse_args()
    if Path(args.out).exists():
        parser.error(f"--out: '{args.out}' exists; choose a new folder")
    return args


def run(args: argparse.Namespace, name: str, extra: list[str]) -> Path:
    overrides = [
        "experiment=tiny_style",
        f"run_dir={Path(args.out) / name}",
        f"trainer.max_steps={args.steps}",
        "trainer.accelerator=cpu",
        "logger=csv",
        "validation.every_n_steps=0",
        "validation.prompts=[]",
        "checkpoint.every_n_steps=0",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides + extra)
    return train(cfg).run_dir / "adapter"


@torch.no_grad()
def samples(adapter: Path | None, args: argparse.Namespace) -> list[Image.Image]:
    pipe = StableDiffusionPipeline.from_pretrained(REPO / "data" / "tiny-sd", safety_checker=None)
    pipe.scheduler = sampler_from(pipe.scheduler, "euler")
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter))
    seeds = [torch.Generator("cpu").manual_seed(seed) for seed in range(args.samples)]
    return pipe([args.class_prompt] * args.samples, num_inference_steps=25, generator=seeds).images


def main() -> None:
    args = parse_args()
    prior = [
        f"prior.path={Path(args.out) / 'class_images'}",
        f"prior.prompt={args.class_prompt}",
        f"prior.num_images={args.class_images}",
    ]
    adapters = {"without_prior": run(args, "without_prior", []), "with_prior": run(args, "with_prior", prior)}
    base = samples(None, args)
    style = [Image.open(p).convert("RGB") for p in sorted((REPO / "data" / "style").glob("*.png"))]
    report = {}
    for name, adapter in adapters.items():
        tuned = samples(adapter, args)
        drift = np.mean(
            [
                np.abs(np.asarray(a, float) - np.asarray(b, float)).mean()
                for a, b in zip(base, tuned, strict=True)
            ]
        )
        report[name] = {
            "drift": round(float(drift), 2),
            "style_leak": round(style_strength(base, tuned, style), 3),
        }
    print(json.dumps({"class_prompt": args.class_prompt, "steps": args.steps, **report}))


if __name__ == "__main__":
    main()
