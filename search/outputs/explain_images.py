"""`cxrtune explain`: Grad-CAM of an exported model on image files — overlay PNG, CAM .npy, JSON line.

The CAM is computed exactly from the loaded module's own feature maps (`model.backbone(x)`) and
head, the same numbers pytorch-grad-cam gives at `meta["target_layer"]` (tests check it).
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainable.cam.explain import edge_band, gradcam_from_maps, normalise_and_resize, region_masses  # noqa: E402
from trainable.data.images import mask_geometry, read_gray  # noqa: E402
from trainable.data.lungs import lung_atlas  # noqa: E402
from trainable.errors import DataError  # noqa: E402
from trainable.export import load_model, preprocess_image  # noqa: E402


def explain_images(model_dir: Path, images: list[Path], out: Path, target: str = "predicted",
                   masks: list[Path] | None = None) -> list[dict]:
    model, meta = load_model(model_dir)
    pre, classes = meta["preprocessing"], meta["classes"]
    if target not in ("predicted", *classes):
        raise DataError(f"--target must be 'predicted' or one of the model's classes {classes} (got {target!r})")
    if masks and len(masks) != len(images):
        raise DataError(f"--mask was given {len(masks)} time(s) for {len(images)} image(s): give one per image or none")
    size, base = pre["input_size"], pre["base_size"]
    edge = edge_band(size, meta.get("edge_band", 0.08))
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, image in enumerate(images):
        if not Path(image).is_file():
            raise DataError(f"image {image} does not exist")
        gray = read_gray(str(image), base)
        if masks:
            mask, mask_source = read_gray(str(masks[n]), base) >= 128, "given"
        else:
            mask, mask_source = lung_atlas(base), "atlas"
        lung = mask_geometry(mask[None], pre["crop_margin"], size)
        x = preprocess_image(gray, meta)
        with torch.no_grad():
            maps = model.backbone(x)
            probs = model.head(maps.mean(dim=(2, 3))).softmax(1)[0].numpy()
        t = int(probs.argmax()) if target == "predicted" else classes.index(target)
        cam = normalise_and_resize(gradcam_from_maps(model.head, maps, torch.tensor([t])), size)[0].detach().numpy()
        lung_mass, edge_mass = region_masses(cam[None], lung, edge)
        stem = Path(image).stem
        np.save(out / f"{stem}.cam.npy", cam.astype(np.float32))
        _overlay(out / f"{stem}.overlay.png", x, pre, cam, lung[0], f"{classes[t]} ({probs[t]:.2f})",
                 lung_mass[0], edge_mass[0])
        line = {"image": str(image), "predicted": classes[int(probs.argmax())],
                "probabilities": dict(zip(classes, map(float, probs))), "target": classes[t],
                "lung_mass": float(lung_mass[0]), "edge_mass": float(edge_mass[0]), "mask": mask_source,
                "cam": str(out / f"{stem}.cam.npy"), "overlay": str(out / f"{stem}.overlay.png")}
        lines.append(line)
    with open(out / "explain.jsonl", "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return lines


def _overlay(path: Path, x: torch.Tensor, pre: dict, cam: np.ndarray, lung: np.ndarray, title: str,
             lung_mass: float, edge_mass: float) -> None:
    gray = (x[0, 0] * pre["std"][0] + pre["mean"][0]).clamp(0, 1).numpy()
    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
    ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.contour(lung, levels=[0.5], colors="lime", linewidths=1.0)
    ax.set_title(f"{title}\nlung {lung_mass:.2f} · edge {edge_mass:.2f}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
