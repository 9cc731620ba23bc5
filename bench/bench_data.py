"""Data pipeline benchmarks, side by side in one run; writes bench/results/data.json.

1. Loader throughput (decode + augment, images/s, 2 DataLoader workers, CPU): our streaming shard
   loader vs the ImageFolder + DataLoader a user would write, on the same stored images. torchvision
   cannot be installed beside our torch build, so the baseline is its straightforward equivalent: a
   map-style Dataset over one JPEG file per image (sorted class folders, like ImageFolder), shuffled
   DataLoader with 2 workers and default_collate, exactly our decode (PIL) and augmentation functions,
   then torchvision's ToTensor (per-image float conversion) re-implemented line for line. And, on the
   very same shards, webdataset's stock loader as its documentation writes it: `wds.WebDataset(urls,
   resampled=True).shuffle(1000).decode("pil").to_tuple("jpg;png", "cls")`, our augmentation mapped over
   it, `.batched()` with our batch assembly (the float batch written in the worker's shared memory), in a
   `wds.WebLoader` with 2 workers: the difference is then only the reading, grouping, decoding and
   shuffling plumbing. Two settings: ImageNet-style (256-short-side JPEGs, random-resized-crop 224 + flip)
   and CIFAR-style (32x32 PNGs, padded crop + flip). Each round measures the three back to back (rotated
   order); "comparisons" holds the per-round paired ratios ours / other (bench/paired.py): median, min,
   max, rounds and the target.
2. Prep throughput: `prepare("imagenet", ...)` with one Ray task per shard on 2 CPUs from larger JPEGs
   (an ImageNet-like 350-500 px), images/s per core.

Images: crops of the real photos that ship with scikit-learn (`load_sample_images`), so JPEG decode
costs are those of natural images. Run: python bench/bench_data.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from paired import comparison  # bench/paired.py (this script's directory is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"
CLASSES = 10


def make_source_images(root: Path, count: int, seed: int = 0) -> None:
    """`root/train/<class>/<i>.JPEG`: random crops (350-500 px a side) of scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = rng.randint(350, 500), rng.randint(350, 420)
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        img = photo.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = root / "train" / f"n{i % CLASSES:08d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=90)


def shards_to_folders(manifest: str, root: Path) -> None:
    """The stored images of prepared shards, one file per image: the baseline reads exactly these bytes."""
    from lipnext_scale.data.shards import resolve_shards
    from lipnext_scale.data.tar_reader import SkipStats, iter_raw_samples

    for url in resolve_shards(manifest):
        for s in iter_raw_samples(url, SkipStats()):
            ext = "jpg" if "jpg" in s.members else "png"
            path = root / f"{int(s.members['cls']):03d}" / f"{s.key}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s.members[ext])


class ImageFolderBaseline(torch.utils.data.Dataset):
    """torchvision.datasets.ImageFolder's behaviour: sorted class folders, one file read per item."""

    def __init__(self, root: Path, dataset: str, image_size: int):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir())]
        self.dataset, self.image_size = dataset, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from lipnext_scale.data.transforms import decode_image, train_augment

        path, label = self.samples[i]
        # One generator per worker process, as torchvision's transforms draw from torch's: the `random` module,
        # which the DataLoader seeds in each worker (a fresh random.Random() per image would cost an os.urandom).
        img = train_augment(decode_image(path.read_bytes()), self.dataset, self.image_size, random)
        return to_tensor(img), label


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision.transforms.functional.to_tensor for an RGB PIL image, line for line."""
    t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
    return t.permute((2, 0, 1)).contiguous().to(dtype=torch.get_default_dtype()).div(255)


def baseline_loader(root: Path, dataset: str, image_size: int, batch_size: int, workers: int):
    """Shuffled like `shuffle=True`, in one epoch of at least CIFAR's 50,000 images: the bench's folders hold
    only a few batches (the digits: 5 of 256), and restarting the workers every 5 batches would charge the
    baseline a start-up that a real data set's epoch amortises."""
    ds = ImageFolderBaseline(root, dataset, image_size)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=max(len(ds), 50_000))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       drop_last=True, persistent_workers=False)  # default_collate


def ours_loader(manifest: str, dataset: str, image_size: int, batch_size: int, workers: int):
    from lipnext_scale.config import DataConfig
    from lipnext_scale.data.shards import make_train_loader

    data = DataConfig(dataset=dataset, batch_size=batch_size, loader_processes=workers, seed=random.randrange(1 << 30))
    return make_train_loader(manifest, data, image_size=image_size)


def webdataset_loader(manifest: str, dataset: str, image_size: int, batch_size: int, workers: int):
    """webdataset's stock pipeline on our shards, with our augmentation (the same work per image)."""
    import webdataset as wds

    from lipnext_scale.data.shards import resolve_shards
    from lipnext_scale.data.streams import collate_train
    from lipnext_scale.data.transforms import to_uint8_hwc, train_augment

    def augment(img: Image.Image) -> np.ndarray:  # `random`: seeded by the loader in each worker
        return to_uint8_hwc(train_augment(img, dataset, image_size, random))

    ds = (wds.WebDataset(resolve_shards(manifest), resampled=True, shardshuffle=False)
          .shuffle(1000).decode("pil").to_tuple("jpg;png", "cls").map_tuple(augment, int)
          .batched(batch_size, collation_fn=collate_train, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)


def _forever(loader):
    while True:  # the baseline is finite (epochs); ours is infinite
        yield from loader


def images_per_s(loader, batches: int, warmup: int = 3) -> float:
    it = _forever(loader)
    for _ in range(warmup):  # worker start-up and the shuffle buffer's first fill are not throughput
        next(it)
    n, t = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        n += images.shape[0]
    rate = n / (time.perf_counter() - t)
    it.close()
    return rate


def bench_loader(name: str, make_ours, make_base, make_wds, batches: int, rounds: int) -> dict:
    ours, base, stock = [], [], []
    variants = [(ours, make_ours), (base, make_base), (stock, make_wds)]
    for r in range(rounds):  # rotated order, so a drift in the machine's load hits all alike
        for rates, make in variants[r % 3:] + variants[:r % 3]:
            rates.append(images_per_s(make(), batches))
    row = {"setting": name, "ours_images_per_s": [round(x, 1) for x in ours],
           "imagefolder_images_per_s": [round(x, 1) for x in base],
           "webdataset_images_per_s": [round(x, 1) for x in stock],
           "ours_median": round(statistics.median(ours), 1), "imagefolder_median": round(statistics.median(base), 1),
           "webdataset_median": round(statistics.median(stock), 1)}
    row["ratio"] = round(row["ours_median"] / row["imagefolder_median"], 3)
    row["ratio_vs_webdataset"] = round(row["ours_median"] / row["webdataset_median"], 3)
    # Each round's measurements run back to back: their ratio cancels most of the shared load.
    row["paired_ratios"] = [round(a / b, 3) for a, b in zip(ours, base)]
    row["paired_ratio_median"] = round(statistics.median(a / b for a, b in zip(ours, base)), 3)
    row["paired_ratios_vs_webdataset"] = [round(a / b, 3) for a, b in zip(ours, stock)]
    row["paired_ratio_vs_webdataset_median"] = round(statistics.median(a / b for a, b in zip(ours, stock)), 3)
    setting = name.split(":")[0]
    row["comparisons"] = {  # bench/paired.py's entries: median of the per-round ratios, min, max, rounds
        f"loader-{setting}-vs-imagefolder": comparison(
            f"{name}: images/s, our shard loader / an ImageFolder-style DataLoader", ours, base, target=1.2),
        f"loader-{setting}-vs-webdataset": comparison(
            f"{name}: images/s, our shard loader / webdataset's stock WebDataset loader, same shards", ours, stock,
            target=1.0)}
    row["rounds"], row["batches_timed"] = rounds, batches
    print(json.dumps(row), flush=True)
    return row


def build_shard_images_per_s(source: Path, count: int = 250) -> float:
    """The per-core ceiling of prep: `build_shard` (decode, resize, encode, tar) in this process, no Ray."""
    from lipnext_scale.data.prep import build_shard
    from lipnext_scale.data.sources import list_source

    plan = list_source("imagenet", str(source))
    samples = plan.splits["train"][:count]
    settings = {"image_size": 256, "image_format": "jpg", "quality": 95, "num_classes": len(plan.classes),
                "classes": plan.classes}
    t = time.perf_counter()
    build_shard(samples, settings)
    return len(samples) / (time.perf_counter() - t)


def machine_info() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    import PIL
    import ray
    import webdataset

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "pillow": PIL.__version__, "ray": ray.__version__,
            "webdataset": getattr(webdataset, "__version__", "1.0.x"), "numpy": np.__version__,
            "loadavg_at_end": list(os.getloadavg())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batches", type=int, default=30)  # per measurement; fewer makes the paired ratios noisy
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a small smoke run (not for the committed numbers)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.quick:
        args.images, args.batches, args.rounds = 300, 4, 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a bench must not write ~/.ray/auth_token
    import ray

    from lipnext_scale.data.prep import ShardFormat, prepare

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a foreign cluster
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_source_images(tmp / "src", args.images)
        prep = prepare("imagenet", str(tmp / "src"), str(tmp / "in256"), ShardFormat(shard_size=250, image_size=256),
                       workers=2, progress=False)
        prep_row = {"images": prep["images_written"], "seconds": prep["seconds"], "workers": 2,
                    "images_per_s": prep["images_per_s"],
                    "images_per_s_per_core": round(prep["images_written"] / prep["seconds"] / 2, 1)}
        prep_row["build_shard_images_per_s_one_process"] = round(build_shard_images_per_s(tmp / "src"), 1)
        print(json.dumps(prep_row), flush=True)
        digits = prepare("digits", None, str(tmp / "digits"), ShardFormat(shard_size=500), workers=2,
                         progress=False)
        ray.shutdown()
        shards_to_folders(str(tmp / "in256" / "train-manifest.parquet"), tmp / "folders256")
        shards_to_folders(str(tmp / "digits" / "train-manifest.parquet"), tmp / "folders32")
        rows = [
            bench_loader("imagenet: 256px JPEG, random-resized-crop 224 + flip, batch 64",
                         lambda: ours_loader(str(tmp / "in256" / "train-manifest.parquet"), "imagenet", 224, 64, 2),
                         lambda: baseline_loader(tmp / "folders256", "imagenet", 224, 64, 2),
                         lambda: webdataset_loader(str(tmp / "in256" / "train-manifest.parquet"), "imagenet", 224,
                                                   64, 2),
                         args.batches, args.rounds),
            bench_loader("cifar-style: 32px PNG (digits), padded crop + flip, batch 256",
                         lambda: ours_loader(str(tmp / "digits" / "train-manifest.parquet"), "digits", 32, 256, 2),
                         lambda: baseline_loader(tmp / "folders32", "digits", 32, 256, 2),
                         lambda: webdataset_loader(str(tmp / "digits" / "train-manifest.parquet"), "digits", 32,
                                                   256, 2),
                         args.batches, args.rounds),
        ]
    result = {
        "loader_ratio_vs_imagefolder": rows[0]["ratio"],
        "loader_ratio_vs_webdataset": {row["setting"].split(":")[0]: row["ratio_vs_webdataset"] for row in rows},
        "comparisons": {key: entry for row in rows for key, entry in row.pop("comparisons").items()},
        "prep_images_per_s_per_core": prep_row["images_per_s_per_core"],
        "loader": rows,
        "prep": prep_row,
        "digits_prep_images_per_s": digits["images_per_s"],
        "notes": ("Baseline = torchvision ImageFolder + DataLoader re-implemented (torchvision is not installable "
                  "beside torch " + torch.__version__ + " here): one JPEG/PNG file per image on local disk (the same "
                  "stored 256-px / 32-px images the shards hold), shuffled by a RandomSampler over one epoch of at "
                  "least 50,000 images (no worker restart every few batches), default_collate, same PIL decode and "
                  "augmentation code drawing from the worker's `random`, torchvision's ToTensor re-implemented "
                  "(per-image float conversion), 2 workers, 1 intra-op thread. Ours: WebDataset tar shards from a "
                  "manifest, resampled shards + shuffle buffer 1000, 2 workers, every shard checked against the "
                  "manifest's sha256 while it streams, float32 batches. webdataset: its stock WebDataset "
                  "(resampled, shuffle 1000, decode('pil'), to_tuple) on the same shards in a WebLoader with 2 "
                  "workers, our augmentation and batch assembly mapped over it, no checksum. Local disk with a "
                  "warm page cache: the file-per-image penalty grows on network/object storage. Prep: one Ray task "
                  "per 250-image shard, 2 CPUs, source JPEGs 350-500 px resized to short side 256 at quality 95; the "
                  "time includes Ray worker start-up and scheduling; build_shard_images_per_s_one_process is the same "
                  "work in one process without Ray (the per-core ceiling). Ratios: per round, the loaders measured "
                  "back to back; 'comparisons' gives their median, min, max and rounds."),
        "settings": {"images": args.images, "batches_timed": args.batches, "rounds": args.rounds, "quick": args.quick},
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
