"""Draw `docs/demo_slices.png`: demo-set slices of AD and NC patients side by side.

    python tools/make_demo_figure.py [--seed 0] [--out docs/demo_slices.png]

Generates a small demo set (the same generator and seed as `vqpix demo-data`) into a temporary
folder and shows one slice per patient at the level of the lateral ventricles, with the
patient's disease and age-related atrophy severities from `demo_info.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from keras_vqpix.data import demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=4, help="Patients per class shown.")
    parser.add_argument("--slice", type=int, default=14, help="Slice of the 20-slice slab.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo_slices.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "demo"
        demo.generate_demo_dataset(
            root, seed=args.seed, train_patients_per_class=args.patients, test_patients_per_class=1
        )
        info = json.loads((root / "demo_info.json").read_text(encoding="utf-8"))
        patients = [p for p in info["patient_params"] if p["split"] == "train"]
        fig, axes = plt.subplots(2, args.patients, figsize=(2.6 * args.patients, 6.0))
        for row, (label, name) in enumerate(((1, "AD"), (0, "NC"))):
            chosen = [p for p in patients if p["label"] == label][: args.patients]
            for ax, params in zip(axes[row], chosen, strict=True):
                slice_number = params["first_slice"] + args.slice
                path = root / "train" / name / f"{params['patient']}_{slice_number}.jpeg"
                ax.imshow(np.asarray(Image.open(path)), cmap="gray", vmin=0, vmax=255)
                ax.set_title(
                    f"{name} {params['patient']} #{slice_number}\n"
                    f"disease {params['disease']:.2f}, age {params['age_atrophy']:.2f}",
                    fontsize=8,
                )
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(
        f"Synthetic demo slices (seed {args.seed}): AD (top) vs NC (bottom); "
        "256x240, from the MNI152 template",
        fontsize=9,
    )
    fig.tight_layout(h_pad=1.5)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
