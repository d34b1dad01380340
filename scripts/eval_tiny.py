"""Measure a shape-scene model: prompt adherence of the base and, with a LoRA, adherence and style strength.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/eval_tiny.py --model data/tiny-sd \
        --adapter outputs/tiny_style/<run>/adapter --out /tmp/eval [--json]

Sample i uses the prompt `a <colour> <shape>` of combination i mod 24 and seed `--seed + i`; with an
adapter the same prompts get the trigger suffix and are sampled by the base and by the LoRA with the
same seeds, so the two grids differ only by the adapter. Metrics: `finetune.tiny.metrics`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: never reach the network

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from finetune.config.files import atomic_path, save_png  # noqa: E402
from finetune.tiny.metrics import adherence, style_strength  # noqa: E402
from finetune.tiny.scenes import COLOURS, SHAPES, STYLE_SUFFIX, caption_for  # noqa: E402
from finetune.validation.samples import SAMPLERS, sampler_from  # noqa: E402

GRID_COLUMNS = 8
VIEW_SIZE = 128  # tiles smaller than this are enlarged (nearest) in saved grids, to be seen at all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="data/tiny-sd", help="diffusers folder (or hub id)")
    parser.add_argument("--adapter", help="LoRA folder or .safetensors file (diffusers or kohya format)")
    parser.add_argument("--samples", type=int, default=48, help="images per set (24 colour x shape pairs)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="euler", choices=[*SAMPLERS, "none"])
    parser.add_argument("--style-data", default="data/style", help="folder of style-set images")
    parser.add_argument("--trigger", default=STYLE_SUFFIX, help="suffix added to prompts for the LoRA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--out", help="folder for the sample grids (existing files are never replaced)")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.steps < 1 or args.batch < 1:
        parser.error("--samples, --steps and --batch must be positive")
    if args.adapter and not Path(args.adapter).exists():
        parser.error(f"--adapter: '{args.adapter}' does not exist")
    if args.adapter and not _style_files(Path(args.style_data)):
        parser.error(f"--style-data: no images in '{args.style_data}' to compare the style with")
    # Checked before sampling, which takes minutes: outputs the user already has are never replaced.
    outputs = grid_paths(Path(args.out), bool(args.adapter)) if args.out else []
    if existing := [str(p) for p in outputs if p.exists()]:
        parser.error(f"--out: {', '.join(existing)} already exist; choose another folder")
    return args


def _style_files(folder: Path) -> list[Path]:
    suffixes = {".png", ".jpg", ".jpeg", ".webp"}
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in suffixes) if folder.is_dir() else []


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def prompts_for(samples: int) -> list[str]:
    """`a <colour> <shape>` for sample i, cycling over every colour x shape pair."""
    pairs = list(itertools.product(COLOURS, SHAPES))
    return [caption_for(*pairs[i % len(pairs)]) for i in range(samples)]


def load_pipeline(model: str, scheduler: str) -> StableDiffusionPipeline:
    # float32 is from_pretrained's default: the CPU cannot run half precision usefully.
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = sampler_from(pipe.scheduler, None if scheduler == "none" else scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, prompts: list[str], args: argparse.Namespace) -> list[Image.Image]:
    """One image per prompt; prompt i always gets seed `args.seed + i`, whatever the batch size."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start : start + args.batch]
        seeds = range(args.seed + start, args.seed + start + len(chunk))
        images += pipe(
            chunk,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        ).images
    return images


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Rows of equal-size tiles in one image, enlarged to at least VIEW_SIZE px per tile."""
    w, h = rows[0][0].size
    scale = max(1, VIEW_SIZE // max(w, h))
    tile = (w * scale, h * scale)
    sheet = Image.new("RGB", (tile[0] * max(map(len, rows)), tile[1] * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.resize(tile, Image.NEAREST), (c * tile[0], r * tile[1]))
    return sheet


def grid_paths(out: Path, with_adapter: bool) -> list[Path]:
    """What `save_grids` writes: a grid per sample set, the base/LoRA comparison, the prompt legend."""
    names = ["base", "base_styled", "lora", "compare"] if with_adapter else ["base"]
    return [out / f"{name}.png" for name in names] + [out / "prompts.txt"]


def save_grids(out: Path, sets: dict[str, list[Image.Image]], prompts: list[str], seed: int) -> None:
    """One grid per set, plus compare.png: a base row above the LoRA row, same prompts and seeds."""
    out.mkdir(parents=True, exist_ok=True)
    chunks = range(0, len(prompts), GRID_COLUMNS)
    sheets = {name: grid([images[i : i + GRID_COLUMNS] for i in chunks]) for name, images in sets.items()}
    if "lora" in sets:
        pairs = [sets[key][i : i + GRID_COLUMNS] for i in chunks for key in ("base_styled", "lora")]
        sheets["compare"] = grid(pairs)
    for name, sheet in sheets.items():
        save_png(sheet, out / f"{name}.png")
    with atomic_path(out / "prompts.txt") as tmp:
        tmp.write_text("".join(f"{i}\tseed {seed + i}\t{p}\n" for i, p in enumerate(prompts)))


def evaluate(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, list[Image.Image]]]:
    """The metrics (all in [0, 1] except style_strength, which is <= 1) and the sample sets."""
    prompts = prompts_for(args.samples)
    pipe = load_pipeline(args.model, args.scheduler)
    sets = {"base": sample(pipe, prompts, args)}
    metrics = {f"base_{k}": v for k, v in adherence(sets["base"], prompts).items() if k != "count"}
    if args.adapter:
        styled = [p + args.trigger for p in prompts]
        sets["base_styled"] = sample(pipe, styled, args)
        pipe.load_lora_weights(args.adapter)
        sets["lora"] = sample(pipe, styled, args)
        for name in ("base_styled", "lora"):
            scores = adherence(sets[name], styled)
            metrics.update({f"{name}_colour": scores["colour"], f"{name}_shape": scores["shape"]})
        style = [_open_rgb(p) for p in _style_files(Path(args.style_data))]
        metrics["style_strength"] = style_strength(sets["base_styled"], sets["lora"], style)
    return metrics, sets


def table(metrics: dict[str, float]) -> str:
    lines = [f"{'samples':<22}{'colour':>8}{'shape':>8}"]
    for name, label in (("base", "base"), ("base_styled", "base + trigger"), ("lora", "lora + trigger")):
        if f"{name}_colour" in metrics:
            lines.append(f"{label:<22}{metrics[f'{name}_colour']:>8.3f}{metrics[f'{name}_shape']:>8.3f}")
    if "style_strength" in metrics:
        lines.append(f"style strength (0 = base, 1 = style set): {metrics['style_strength']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics, sets = evaluate(args)
    if args.out:
        save_grids(Path(args.out), sets, prompts_for(args.samples), args.seed)
    print(json.dumps(metrics) if args.json else table(metrics))


if __name__ == "__main__":
    main()
