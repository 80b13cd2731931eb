"""Extraction backends on the real images (issue 26): Keras float32, Keras bfloat16 (today's default
on a CPU with AVX-512 BF16) and the int8 network of `leukemia.backends`, side by side.

224 px, the overlay mask on, the offline VGG16 weights, every pooled output (`features.
build_extractor`, the pipeline's extractor). The int8 network is calibrated on `--calibration`
images of the project split's train images (`backends.calibration_sample`, seed 0) and cached in
bench/out/backends/.

Speed: `--speed-images` test images, decoded once into memory (the arithmetic is measured, not the
JPEG decoding), go through every backend in batches of 32, `--rounds` rounds, the order of the
backends rotated each round so that a change of the machine's load hits each of them alike.
images/s: all images over all the time; best: the fastest round. Then the same in a subprocess with
`ONEDNN_MAX_CPU_ISA=AVX2` (`--isa`), which caps TensorFlow's oneDNN and OpenVINO's CPU plugin
alike: what an AVX2-only machine gets (its kernels are named in the table). `openvino fp32` (the
float32 network in OpenVINO's runtime, not a backend) tells the runtime's share of the gain from
int8's.

Quality (`--quality`): the int8 features of all images (cached in
bench/out/backends/features-int8-<key>/) beside bench/quality.py's bfloat16 cache, and the float32
features of the test images (of all images with `--fp32-quality`, which adds a float32 row; slow),
in bench/out/quality/features; the default pipeline's configuration on the project split
(bench/calibration.py's replay of the default grid selected `rmsprop · bs16 · multiscale · linear →
refit 9 ep`) trained on the train + val features of each backend: test errors and malignant
sensitivity; and each head's agreement (`backends.agreement`) between the float32 test features and
its own backend's, as a run would log it. `--replay-grid` replays the whole default grid per backend
instead (bench/calibration.py; about 5 minutes a backend on a quiet machine).

    python bench/backends.py [--speed-images 64] [--rounds 3] [--calibration 300] [--quality]
                             [--isa AVX2] [--fp32-quality] [--replay-grid]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, machine, parse_real_data_args, real_data_parser, table  # noqa: E402

WORK = OUT / "backends"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
#: The default pipeline's choice on the project split (bench/calibration.py, seed 0).
DEFAULT_HEAD = {"optimizer": "rmsprop", "batch_size": 16, "head": "linear", "epochs": 9}
BATCH = 32


def cpu_flags() -> str:
    """The instruction-set flags that matter here, as /proc/cpuinfo lists them."""
    words = set(Path("/proc/cpuinfo").read_text().split())
    return " ".join(f if f in words else f"-{f}" for f in FLAGS)


def load() -> str:
    """The 1-minute load average over the cores (the other work on this machine)."""
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def setup(args: Any) -> dict[str, Any]:
    """The project split, the model configuration and the int8 calibration (seeded train images)."""
    from leukemia.backends import Calibration, calibration_sample
    from leukemia.dataset import make_split, read_split
    from leukemia.model import ModelConfig

    rows = read_split(make_split(args.data, OUT / "quality" / "splits", seed=0).path)
    path = {r["sha256"]: args.data / r["path"] for r in rows}
    train = calibration_sample(
        [r["sha256"] for r in rows if r["split"] == "train"], args.calibration
    )
    cfg = ModelConfig(input_size=224, weights=str(args.weights), variant="multiscale")
    calibration = Calibration.from_images([path[s] for s in train], train, 224)
    return {"rows": rows, "path": path, "cfg": cfg, "calibration": calibration}


def openvino_fp32(cfg: Any) -> Any:
    """The float32 extractor in OpenVINO's runtime, run as the int8 one is (a diagnostic)."""
    import tempfile

    import openvino as ov

    from leukemia.backends import CPU_CONFIG, Int8Extractor
    from leukemia.features import build_extractor

    with tempfile.TemporaryDirectory() as tmp:
        build_extractor(cfg, "float32").export(tmp, format="tf_saved_model", verbose=False)
        core = ov.Core()
        compiled = core.compile_model(core.read_model(tmp), "CPU", CPU_CONFIG)
    return Int8Extractor(compiled, "fp32", Path(tmp))


def kernels(extractor: Any) -> str:
    """The CPU plugin's kernels of the convolutions (e.g. brgconv_avx512_core_vnni_I8)."""
    from collections import Counter

    found = Counter(
        str(op.get_rt_info()["primitiveType"].astype(str))
        for op in extractor.compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    )
    return ", ".join(f"{name} ×{n}" for name, n in found.most_common())


def speed(args: Any, env: dict[str, Any]) -> list[dict[str, Any]]:
    """images/s of each backend on the same in-memory images, rounds interleaved."""
    import numpy as np

    from leukemia.backends import int8_extractor
    from leukemia.features import build_extractor, load_images, resolve_precision

    test = sorted(r["sha256"] for r in env["rows"] if r["split"] == "test")[: args.speed_images]
    pixels = load_images([env["path"][s] for s in test], 224)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    # an AVX2-only CPU has no avx512_bf16 flag: `resolve_precision("auto")` picks float32 there
    default = "float32" if isa.upper() in ("AVX2", "AVX", "SSE41") else resolve_precision("auto")
    cfg = env["cfg"]
    int8 = int8_extractor(cfg, env["calibration"], WORK)
    extractors = {"keras float32": build_extractor(cfg, "float32")}
    rows = []
    if default == "float32":  # below AVX-512 BF16, TF's oneDNN aborts the process on bfloat16
        rows.append({"ISA cap": isa, "backend": "keras bfloat16", "images/s": "aborts"})
        rows[0]["kernels"] = "oneDNN: no bfloat16 matmul primitive (dnnl::error, process ends)"
    else:
        extractors["keras bfloat16"] = build_extractor(cfg, "bfloat16")
    extractors["int8"] = int8
    extractors["openvino fp32 (diagnostic)"] = openvino_fp32(cfg)
    spent = {name: [] for name in extractors}
    for extractor in extractors.values():
        extractor.predict_on_batch(pixels[:BATCH])  # warm-up: tracing, compilation, caches
    names = list(extractors)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            for first in range(0, len(pixels), BATCH):
                extractors[name].predict_on_batch(pixels[first : first + BATCH])
            spent[name].append(time.perf_counter() - started)
    first = pixels[:BATCH]  # outputs kept to compare the ISAs' int8 numbers (`isa_drift`)
    outputs = {
        n: np.asarray(extractors[n].predict_on_batch(first)) for n in ("keras float32", "int8")
    }
    np.savez(WORK / f"outputs-{isa}.npz", fp32=outputs["keras float32"], int8=outputs["int8"])
    for name, times in spent.items():
        rows.append(
            {
                "ISA cap": isa,
                "backend": name + (" (default)" if name == f"keras {default}" else ""),
                "images/s": len(pixels) * len(times) / sum(times),
                "best round": len(pixels) / min(times),
                "kernels": "TF oneDNN" if name.startswith("keras") else kernels(extractors[name]),
            }
        )
    return rows


def capped_speed(args: Any, isa: str) -> list[dict[str, Any]]:
    """`speed` again in a subprocess whose oneDNN (TensorFlow's and OpenVINO's) is capped at `isa`."""
    out = WORK / f"speed-{isa}.json"
    command = [sys.executable, __file__, "--speed-only", "--json", str(out)]
    command += ["--speed-images", str(args.speed_images), "--rounds", str(args.rounds)]
    command += ["--calibration", str(args.calibration), "--data", str(args.data)]
    command += ["--weights", str(args.weights)]
    subprocess.run(command, check=True, env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa})
    return json.loads(out.read_text())


def isa_drift(isas: list[str]) -> str:
    """How far int8 features move between this CPU's kernels and each capped run's, and from the
    float32 ones: the largest difference over an image's largest float32 feature."""
    import numpy as np

    native = np.load(WORK / "outputs-native.npz")
    scale = np.abs(native["fp32"]).max(axis=1, keepdims=True)

    def worst(a: Any, b: Any) -> str:
        return f"{float((np.abs(a - b) / scale).max()):.2%}"

    lines = [f"int8 vs float32 (native): {worst(native['int8'], native['fp32'])}"]
    for isa in isas:
        capped = np.load(WORK / f"outputs-{isa}.npz")
        lines.append(f"int8 {isa} vs int8 native: {worst(capped['int8'], native['int8'])}")
        lines.append(f"float32 {isa} vs native: {worst(capped['fp32'], native['fp32'])}")
    return "Largest feature difference over the image's largest feature, first batch: " + "; ".join(
        lines
    )


def int8_features(env: dict[str, Any], batch_size: int = BATCH) -> tuple[str, float]:
    """The int8 features of every image, cached like the pipeline's (one shard file per 500
    images); the folder and the images/s of the extraction (0 when all were cached)."""
    import numpy as np

    from leukemia.backends import int8_extractor
    from leukemia.features import IMAGES_PER_SHARD, cache_index, iter_image_batches, write_part
    from leukemia.objectstore import open_store

    extractor = int8_extractor(env["cfg"], env["calibration"], WORK)
    folder = str(WORK / f"features-int8-{extractor.key}")
    store = open_store(folder)
    todo = sorted({r["sha256"] for r in env["rows"]} - set(cache_index(store)))
    started = time.perf_counter()
    for first in range(0, len(todo), IMAGES_PER_SHARD):
        part = todo[first : first + IMAGES_PER_SHARD]
        batches = iter_image_batches([env["path"][s] for s in part], 224, batch_size)
        write_part(store, part, np.concatenate([extractor.predict_on_batch(b) for b in batches]))
        print(f"    int8 features: {first + len(part)}/{len(todo)}", flush=True)
    seconds = time.perf_counter() - started
    return folder, (len(todo) / seconds if todo else 0.0)


def train_default(rows: list[dict[str, str]], cache: str, args: Any) -> dict[str, Any]:
    """The default configuration refitted on train + val features; test labels and probabilities."""
    import numpy as np

    from leukemia.model import ModelConfig
    from leukemia.runs import train_val_arrays
    from leukemia.training import TrainConfig, fit_head, split_arrays

    if args.replay_grid:
        from calibration import replay_default

        found = replay_default(rows, Path(cache), args)
        return {"y": found["y_test"], "prob": found["test"], "selected": found["selected"]}
    cfg = TrainConfig(
        optimizer=DEFAULT_HEAD["optimizer"],
        batch_size=DEFAULT_HEAD["batch_size"],
        epochs=DEFAULT_HEAD["epochs"],
        cv_folds=1,
        model=ModelConfig(224, str(args.weights), "multiscale", head=DEFAULT_HEAD["head"]),
    )
    data = split_arrays(rows, cache, "multiscale")
    x, y, _ = train_val_arrays(data)
    head, _ = fit_head(cfg, x, y, None, None)
    prob = np.asarray(head.predict_on_batch(data["test"][0]))
    return {"y": data["test"][1], "prob": prob, "head": head, "selected": cfg.name}


def extract_keras(env: dict[str, Any], shas: list[str], precision: str) -> Any:
    """bench/quality.py's feature cache of these images in `precision` (computes what it lacks)."""
    from leukemia.features import extract_features

    paths = [env["path"][s] for s in shas]
    root = OUT / "quality" / "features"
    return extract_features(paths, shas, env["cfg"], root, precision=precision)


def quality(args: Any, env: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Test-split quality of the default head on each backend's features, and each head's
    agreement between float32 test features and its own backend's."""
    from quality import scores

    from leukemia.backends import agreement
    from leukemia.features import load_features

    rows = env["rows"]
    test = [r["sha256"] for r in rows if r["split"] == "test"]
    int8_dir, int8_rate = int8_features(env)
    bf16 = extract_keras(env, [r["sha256"] for r in rows], "bfloat16")
    fp32 = extract_keras(env, [r["sha256"] for r in rows] if args.fp32_quality else test, "float32")
    print(
        f"    computed: int8 {int8_rate:.1f} images/s; bfloat16 {bf16.computed} images; float32 "
        f"{fp32.computed} images ({fp32.images_per_s} images/s) ({load()})",
        flush=True,
    )
    caches = {"keras bfloat16 (default)": bf16.cache_dir, "int8": int8_dir}
    if args.fp32_quality:
        caches = {"keras float32": fp32.cache_dir, **caches}
    reference = load_features(fp32.cache_dir, test, "multiscale")
    out, lines = [], []
    for name, cache in caches.items():
        fitted = train_default(rows, cache, args)
        pred = fitted["prob"].argmax(1)
        errors = f"{int((fitted['y'] != pred).sum())} / {len(pred)}"
        out.append({"backend": name, "errors": errors, **scores(fitted["y"], pred)})
        out[-1]["selected"] = fitted["selected"]
        if "head" in fitted and name != "keras float32":
            found = agreement(fitted["head"], reference, load_features(cache, test, "multiscale"))
            lines.append(
                f"{name} head, float32 vs {name.split()[1] if ' ' in name else name} test "
                f"features: argmax agreement {found['argmax_agreement']:.4f} over "
                f"{found['images']} images, largest probability difference "
                f"{found['max_probability_difference']:.4f}"
            )
    return out, lines


def main() -> None:
    parser = real_data_parser(__doc__)
    parser.add_argument("--speed-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=300, help="int8 calibration images")
    parser.add_argument("--isa", nargs="*", default=["AVX2"], help="capped runs (none: skip)")
    parser.add_argument("--quality", action="store_true", help="test-split quality per backend")
    parser.add_argument("--fp32-quality", action="store_true", help="float32 row too (slow)")
    parser.add_argument("--replay-grid", action="store_true", help="the whole default grid")
    parser.add_argument("--cv-folds", type=int, default=5, help="with --replay-grid")
    parser.add_argument("--speed-only", action="store_true", help=argparse_hidden())
    parser.add_argument("--json", type=Path, help=argparse_hidden())
    args = parse_real_data_args(parser)
    env = setup(args)
    if args.speed_only:
        args.json.write_text(json.dumps(speed(args, env)))
        return
    print(f"{machine()}; CPU flags: {cpu_flags()}; {load()}", flush=True)
    started = time.perf_counter()
    from leukemia.backends import int8_extractor

    int8_extractor(env["cfg"], env["calibration"], WORK)
    print(
        f"int8 network ready in {time.perf_counter() - started:.0f} s (calibration "
        f"{args.calibration} train images, {env['calibration'].identity})",
        flush=True,
    )
    rows = speed(args, env)
    print(f"  native speed done ({load()})", flush=True)
    for isa in args.isa:
        rows += capped_speed(args, isa)
        print(f"  {isa} speed done ({load()})", flush=True)
    for row in rows:
        base = [r for r in rows if r["ISA cap"] == row["ISA cap"] and "(default)" in r["backend"]]
        if base and isinstance(row["images/s"], float):
            row["× default"] = row["images/s"] / base[0]["images/s"]
    print(
        f"\n{args.speed_images} test images × {args.rounds} rounds, batches of {BATCH}, 224 px, "
        "masked, multiscale (every pooled output):"
    )
    print(
        table(rows, ["ISA cap", "backend", "images/s", "best round", "× default", "kernels"]),
        flush=True,
    )
    print(isa_drift(args.isa), flush=True)
    if args.quality:
        found, lines = quality(args, env)
        print(
            "\nProject split, test images, the default configuration refitted on each backend's "
            "features:"
        )
        print(
            table(
                found,
                [
                    "backend",
                    "errors",
                    "accuracy",
                    "f1_macro",
                    "malignant_sensitivity",
                    "benign_specificity",
                    "selected",
                ],
            )
        )
        print("\n".join(lines))
    print(f"\n{load()}; {time.perf_counter() - started:.0f} s in all", flush=True)


def argparse_hidden() -> str:
    """Help text of the internal options (the capped subprocess)."""
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
