"""Decode images and masks once, then apply the crop/augmentation geometry in batches.

Geometry (the same for an image and its lung mask):
  1. decode to 8-bit grayscale and resize to `base_size` × `base_size`;
  2. optional augmentation view: a seeded random affine (shift, zoom, rotation, flips);
  3. crop: keep the central (1 − 2·margin) of each side, then resize to `input_size`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from trainable.data.augment import AugmentPolicy
from trainable.data.dataset import Dataset
from trainable.data.dicom import is_dicom, open_dicom
from trainable.errors import DataError


def decode_images(dataset: Dataset, base_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All images as uint8 (N, S, S) and their masks as bool (N, S, S) (all False where none).

    A file that cannot be decoded, or a mask whose size differs from its image, is a DataError
    naming the file.
    """
    n = len(dataset)
    images = np.empty((n, base_size, base_size), np.uint8)
    masks = np.zeros((n, base_size, base_size), bool)
    for i, (path, mask_path) in enumerate(zip(dataset.table["path"], dataset.table["mask_path"])):
        img = open_image(path, "image")
        images[i] = _resized(img, base_size)
        if mask_path:
            mask = open_image(mask_path, "mask")
            if mask.size != img.size:
                raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                                f"{path} is {img.size[0]}x{img.size[1]}: a mask must match its image")
            m = np.asarray(mask.resize((base_size, base_size), Image.BILINEAR))
            masks[i] = m >= 128
    return images, masks


def read_gray(path: str, size: int) -> np.ndarray:
    """One image file as uint8 (size, size) grayscale, decoded exactly as `decode_images` does."""
    return _resized(open_image(path, "image"), size)


def _resized(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.resize((size, size), Image.BILINEAR))


def open_image(path: str, what: str) -> Image.Image:
    if is_dicom(path):  # DICOM: modality LUT, VOI LUT / window, MONOCHROME1 inverted → 8-bit 'L'
        return open_dicom(path, what)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                black = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(black, im)
            if im.mode == "I;16" or im.mode == "I":
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = arr.min(), arr.max()
                arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
                return Image.fromarray(arr.astype(np.uint8))
            return im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


def view_params(policy: AugmentPolicy, n: int, seed: int, view: int) -> np.ndarray:
    """Per-image affine parameters (dx, dy, zoom, angle, hflip, vflip) of one augmentation view.

    View 0 is always the identity, so validation and Grad-CAM see the unaugmented image.
    """
    params = np.zeros((n, 6), np.float64)
    params[:, 2] = 1.0
    if view == 0:
        return params
    rng = np.random.default_rng([seed, view])
    params[:, 0:2] = rng.uniform(-policy.shift, policy.shift, (n, 2))
    params[:, 2] = rng.uniform(1 - policy.zoom, 1 + policy.zoom, n)
    params[:, 3] = rng.uniform(-policy.rotation, policy.rotation, n)
    params[:, 4] = policy.hflip & (rng.random(n) < 0.5)
    params[:, 5] = policy.vflip & (rng.random(n) < 0.5)
    return params


def apply_affine(batch: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """Affine-transform each (1, S, S) float image by its row of `params` (zero fill)."""
    if not np.any(params[:, [0, 1, 3, 4, 5]]) and np.all(params[:, 2] == 1.0):
        return batch
    # imported here: torchvision (with torch._dynamo, ≈ 3.5 s) is needed only to augment, and a
    # trial process that imports this module for its geometry never does
    from torchvision.transforms.v2 import functional as TF

    side = batch.shape[-1]
    out = torch.empty_like(batch)
    for i, (dx, dy, zoom, angle, hflip, vflip) in enumerate(params):
        x = batch[i]
        if hflip:
            x = torch.flip(x, dims=[-1])
        if vflip:
            x = torch.flip(x, dims=[-2])
        out[i] = TF.affine(x, angle=float(angle), translate=[round(dx * side), round(dy * side)],
                           scale=float(zoom), shear=[0.0, 0.0],
                           interpolation=TF.InterpolationMode.BILINEAR)
    return out


def crop_resize(batch: torch.Tensor, margin: float, input_size: int) -> torch.Tensor:
    """Keep the central (1 − 2·margin) of each side of (N, C, S, S), resized to input_size."""
    side = batch.shape[-1]
    cut = int(round(side * margin))
    if cut:
        batch = batch[..., cut:side - cut, cut:side - cut]
    if batch.shape[-1] != input_size:
        batch = F.interpolate(batch, size=(input_size, input_size), mode="bilinear",
                              align_corners=False, antialias=True)
    return batch


def geometry(images: np.ndarray, margin: float, input_size: int,
             params: np.ndarray | None = None) -> torch.Tensor:
    """uint8 (N, S, S) → float (N, 1, input, input) in [0, 1], augmented then cropped."""
    x = torch.tensor(images).unsqueeze(1).float().div_(255.0)  # copy: object-store arrays are read-only
    if params is not None:
        x = apply_affine(x, params)
    return crop_resize(x, margin, input_size)


def to_model_input(x: torch.Tensor, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]
                   ) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] → the backbone's channel count and normalisation."""
    x = x.expand(-1, in_chans, -1, -1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)) / torch.tensor(
        std, dtype=x.dtype).view(1, -1, 1, 1)


def mask_geometry(masks: np.ndarray, margin: float, input_size: int,
                  params: np.ndarray | None = None) -> np.ndarray:
    """Lung masks through exactly the image's geometry: bool (N, input, input). `params`: the
    augmentation of each image (`view_params` rows), applied to its mask as `geometry` applies it
    to the image (the fine-tuning stage's Grad-CAM loss needs the mask of the view it trains on)."""
    x = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
    if params is not None:
        x = apply_affine(x, params)
    return (crop_resize(x, margin, input_size)[:, 0] >= 0.5).numpy()


