"""Training speed and memory: ``lorareg train`` against a minimal diffusers + peft training loop.

The baseline is the loop of diffusers' ``train_text_to_image_lora.py`` example, written out in a
few dozen lines: the same base model, data, batch size, resolution, rank, target layers
(attention q/k/v/out), optimizer (AdamW, lr 1e-4, weight decay 1e-2), gradient clipping,
precision and TensorBoard logging of the loss every step. It encodes every batch with the VAE
and the text encoder, as the example does. ``lorareg train`` runs as users run it (the CLI, in
its own process) twice: with its defaults (latents and caption embeddings cached before
training, the VAE and text encoder then released) and with both caches off, which is the
baseline's work step for step.

Every run is a fresh process; runs alternate between variants (the order rotates from one
repeat to the next) and the median of ``--repeats`` is reported. Steps/s counts optimizer steps after the first (which carries one-off work) to
the last; the median step is the median time between consecutive step ends (the first left
out), which pauses disturb less than the mean; CPU per step is the process's CPU time (all its
threads) per median step, which other processes on a busy machine disturb far less than wall
time; "vs baseline" columns are speed ratios (> 1: faster than the baseline). Peak memory
is the process's peak resident set on CPU, and ``torch.cuda.max_memory_allocated`` on CUDA.
Wall time is the whole command, start-up included. The machine's load average is printed before
and after (other processes slow every variant alike only if they stay steady).

On CPU the base is the tiny SD1 pipeline (``lorareg tiny-model``); on CUDA it is an SD1.5-sized
pipeline with random weights (860M-parameter UNet, full VAE, CLIP-L-sized text encoder) at
512 px in bf16 mixed precision.

    python benchmarks/train.py                         # CPU, tiny SD1, 64 px
    python benchmarks/train.py --device cuda           # SD1.5-sized UNet, 512 px, bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# --- the baseline: a minimal diffusers + peft loop ---------------------------------------------------------------


def baseline(args: argparse.Namespace, on_step=None) -> dict:
    """Train like diffusers' LoRA example; return steps/s and peak memory (``on_step()`` after each step)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator = Accelerator(mixed_precision=args.precision, log_with="tensorboard",
                              project_dir=str(Path(args.output) / "logs"))
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    base = args.base
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=weight_dtype)
    torch.manual_seed(args.seed)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    for parameter in unet.parameters():  # trainable LoRA factors in float32, as lorareg keeps them
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    images = sorted((DATA / "images").glob("*.png"))
    captions = [(DATA / "texts" / f"{p.stem}.txt").read_text().strip() for p in images]

    def example(index: int) -> dict:
        image = Image.open(images[index]).convert("RGB")
        scale = args.resolution / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - args.resolution) // 2, (image.height - args.resolution) // 2
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
        ids = tokenizer(captions[index], max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}

    loader = torch.utils.data.DataLoader(list(range(len(images))), batch_size=args.batch_size, shuffle=True,
                                         collate_fn=lambda idx: torch.utils.data.default_collate([example(i) for i in idx]))
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    accelerator.init_trackers("baseline")
    stamps, cpu_stamps = [], []
    step = 0
    while step < args.steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy = scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
                prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
                average = accelerator.gather(loss.repeat(args.batch_size)).mean().item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                accelerator.log({"train_loss": average}, step=step)
                stamps.append(time.perf_counter())
                cpu_stamps.append(time.process_time())
                if on_step is not None:
                    on_step()
                if step >= args.steps:
                    break
    accelerator.end_training()
    device = accelerator.device
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def median_gap(values: list[float]) -> float:  # as lorareg reports median_step_seconds
        gaps = sorted(b - a for a, b in itertools.pairwise(values[1:]))
        return gaps[len(gaps) // 2]

    return {"steps": step, "steps_per_second": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "median_step_seconds": median_gap(stamps), "median_step_cpu_seconds": median_gap(cpu_stamps),
            "peak_memory_bytes": peak}


# --- exact work per step -------------------------------------------------------------------------------------------


class StepCounter:
    """Counts Python function calls (cProfile) and torch operations (torch.profiler) over steps 3 to 5."""

    FIRST, LAST = 2, 5  # after the 2nd step (warm), until the 5th: three steps

    def __init__(self) -> None:
        self.step, self.calls, self.ops, self.profilers = 0, 0, 0, None

    def __call__(self, *_) -> None:
        import cProfile
        import pstats

        from torch.profiler import ProfilerActivity, profile

        self.step += 1
        if self.step == self.FIRST:
            self.profilers = (cProfile.Profile(), profile(activities=[ProfilerActivity.CPU]))
            self.profilers[1].__enter__()
            self.profilers[0].enable()
        elif self.step == self.LAST:
            self.profilers[0].disable()
            self.profilers[1].__exit__(None, None, None)
            self.calls = pstats.Stats(self.profilers[0]).total_calls
            self.ops = sum(event.count for event in self.profilers[1].key_averages() if event.key.startswith("aten::"))

    def result(self) -> dict:
        steps = self.LAST - self.FIRST
        return {"python_calls_per_step": self.calls / steps, "torch_ops_per_step": self.ops / steps}


def count_step_work(args: argparse.Namespace) -> dict:
    """Run one loop without caches and count its work per step (``--count``)."""
    counter = StepCounter()
    args.steps = StepCounter.LAST + 1
    if args.worker == "count-baseline":
        baseline(args, on_step=counter)
        return counter.result()
    if args.checkout:
        sys.path.insert(0, args.checkout)
    from loralib.training import Trainer, load_config

    settings = {"base_model": str(args.base), "data_dir": str(DATA), "output_dir": args.output, "model_name": "bench",
                "resolution": args.resolution, "batch_size": args.batch_size, "rank": args.rank,
                "target_modules": "attention", "max_train_steps": args.steps, "learning_rate": 1e-4,
                "mixed_precision": args.precision, "seed": args.seed, "cache_latents": False,
                "cache_text_embeddings": False}
    Trainer(load_config(None, settings), force=True, on_step=counter).run()
    return counter.result()


# --- base models ---------------------------------------------------------------------------------------------------


def build_sd15_sized(path: Path) -> Path:
    """An SD1.5-sized pipeline with random weights (tiny tokenizer), saved in fp16."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loralib.architectures import CLIP_L_CONFIG, SD15_UNET_CONFIG
    from loralib.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG, vocab_size=len(tokenizer), bos_token_id=0,
                                                    eos_token_id=1, pad_token_id=1, max_position_embeddings=77))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(path)
    return path


# --- running and reporting -----------------------------------------------------------------------------------------


def _run(command: list[str], env: dict, root: Path = ROOT) -> tuple[dict, float]:
    began = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} … failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):]), wall


# Runs ``lorareg`` from another source tree (argv[1]) with its own packages, as pyproject.toml maps them
# (lorareg.cli -> cli/, lorareg.registry -> registry/), whatever the virtual environment has installed.
CHECKOUT_LAUNCHER = """
import importlib.util, sys
root = sys.argv.pop(1)
sys.path.insert(0, root)
import lorareg
for sub in ("cli", "registry"):
    spec = importlib.util.spec_from_file_location(f"lorareg.{sub}", f"{root}/{sub}/__init__.py",
                                                  submodule_search_locations=[f"{root}/{sub}"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
from lorareg.cli.main import main
main()
"""


def lorareg_command(args, output: Path, cached: bool, checkout: Path | None = None) -> list[str]:
    """The ``lorareg train`` command of one run (of the source tree ``checkout``, default this one)."""
    start = [sys.executable, "-c", CHECKOUT_LAUNCHER, str(checkout)] if checkout else [sys.executable, "-m", "lorareg"]
    command = [*start, "train", "--json", "--force", "--base", str(args.base),
               "--data", str(DATA), "-o", str(output), "--name", "bench", "--resolution", str(args.resolution),
               "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--target-modules", "attention",
               "--max-train-steps", str(args.steps), "--learning-rate", "1e-4", "--mixed-precision", args.precision,
               "--seed", str(args.seed)]
    if not cached:
        command += ["--no-cache-latents", "--no-cache-text-embeddings"]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 30 CPU, 40 CUDA)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 CPU, 512 CUDA)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="also run another lorareg source tree without caches (e.g. `git archive main | tar -x -C "
                             "/tmp/main`), alternating with the others: a before/after comparison on the same machine")
    parser.add_argument("--count", action="store_true",
                        help="instead of timing, count the Python calls and torch operations of three steps of each "
                             "loop without caches: exact figures that other processes cannot disturb")
    parser.add_argument("--worker", choices=["baseline", "count-baseline", "count-lorareg"], help=argparse.SUPPRESS)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "baseline":
        print(json.dumps(baseline(args)))
        return
    if args.worker:
        print(json.dumps(count_step_work(args)))
        return

    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.steps = args.steps or (40 if cuda else 30)
    args.resolution = args.resolution or (512 if cuda else 64)
    args.precision = "bf16" if cuda else "no"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # alike for all
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="lorareg-bench-") as tmp:
        work = Path(tmp)
        env["LORAREG_HOME"] = str(work / "home")
        began = time.perf_counter()
        if cuda:
            args.base = build_sd15_sized(work / "base")
            model = "SD1.5-sized random pipeline (860M-parameter UNet)"
        else:
            from loralib.tiny_models import save_tiny_pipeline

            args.base = save_tiny_pipeline(work / "base", "sd1")
            model = "tiny SD1 pipeline"
        print(f"base model: {model}, built in {time.perf_counter() - began:.1f} s; {args.resolution} px, batch "
              f"{args.batch_size}, rank {args.rank}, {args.steps} steps, precision {args.precision}, "
              f"{'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}", flush=True)
        variants = {
            "baseline (diffusers example loop)": lambda out: [sys.executable, __file__, "--worker", "baseline",
                                                             "--base", str(args.base), "--output", str(out),
                                                             "--steps", str(args.steps), "--batch-size",
                                                             str(args.batch_size), "--resolution", str(args.resolution),
                                                             "--rank", str(args.rank), "--precision", args.precision,
                                                             "--seed", str(args.seed)],
            "lorareg train (defaults: cached)": lambda out: lorareg_command(args, out, cached=True),
            "lorareg train (no caches)": lambda out: lorareg_command(args, out, cached=False),
        }
        roots = {name: ROOT for name in variants}
        if args.compare:
            name = f"lorareg train at {args.compare} (no caches)"
            variants[name] = lambda out: lorareg_command(args, out, cached=False, checkout=args.compare.resolve())
            roots[name] = args.compare.resolve()
        if args.count:
            _count(args, work, env)
            return
        results: dict[str, list[tuple[dict, float]]] = {name: [] for name in variants}
        order = list(variants.items())
        for repeat in range(args.repeats):
            # rotate the order, so that no variant always runs first (or right after another)
            for index, (name, command) in enumerate(order[repeat % len(order):] + order[:repeat % len(order)]):
                root = roots[name]
                run_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", ""))
                                                                   if p)}
                results[name].append(_run(command(work / f"run{repeat}-{index}"), run_env, root))
                report, wall = results[name][-1]
                step, cpu = report.get("median_step_seconds"), report.get("median_step_cpu_seconds")
                shown = f", median step {step * 1000:.1f} ms, CPU {cpu * 1000:.1f} ms" if step and cpu else ""
                print(f"  run {repeat + 1}: {name}: {report['steps_per_second']:.2f} steps/s{shown}, "
                      f"{report['peak_memory_bytes'] / 2**20:.0f} MiB, {wall:.1f} s", flush=True)
    summary = {name: (statistics.median(r["steps_per_second"] for r, _ in runs),
                      statistics.median(r.get("median_step_seconds") or math.nan for r, _ in runs),
                      statistics.median(r.get("median_step_cpu_seconds") or math.nan for r, _ in runs),
                      statistics.median(r["peak_memory_bytes"] for r, _ in runs),
                      statistics.median(w for _, w in runs)) for name, runs in results.items()}
    speed0, step0, cpu0, memory0, _ = summary["baseline (diffusers example loop)"]
    what = "peak GPU memory allocated" if cuda else "peak RSS"
    print(f"\nload average: {_load()} (before: {load_before})")
    print(f"\n| variant | steps/s | vs baseline | median step | vs baseline | CPU per step | vs baseline | {what} | "
          "memory vs baseline | wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (speed, step, cpu, memory, wall) in summary.items():
        print(f"| {name} | {speed:.2f} | {speed / speed0:.2f}x | {step * 1000:.1f} ms | {step0 / step:.2f}x | "
              f"{cpu * 1000:.1f} ms | {cpu0 / cpu:.2f}x | {memory / 2**20:.0f} MiB | {memory / memory0:.2f}x | "
              f"{wall:.1f} s |")


def _count(args: argparse.Namespace, work: Path, env: dict) -> None:
    common = ["--base", str(args.base), "--batch-size", str(args.batch_size), "--resolution", str(args.resolution),
              "--rank", str(args.rank), "--precision", args.precision, "--seed", str(args.seed)]
    loops = {"baseline (diffusers example loop)": ["count-baseline"], "lorareg (no caches)": ["count-lorareg"]}
    if args.compare:
        loops[f"lorareg at {args.compare} (no caches)"] = ["count-lorareg", "--checkout", str(args.compare.resolve())]
    counted = {}
    for index, (name, worker) in enumerate(loops.items()):
        command = [sys.executable, __file__, "--worker", *worker, "--output", str(work / f"count{index}"), *common]
        counted[name], _ = _run(command, env)
    calls0, ops0 = (counted["baseline (diffusers example loop)"][k] for k in ("python_calls_per_step",
                                                                            "torch_ops_per_step"))
    print("\n| loop | Python calls per step | vs baseline | torch operations per step | vs baseline |")
    print("|---|---|---|---|---|")
    for name, c in counted.items():
        print(f"| {name} | {c['python_calls_per_step']:.0f} | {c['python_calls_per_step'] / calls0:.2f}x | "
              f"{c['torch_ops_per_step']:.0f} | {c['torch_ops_per_step'] / ops0:.2f}x |")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
