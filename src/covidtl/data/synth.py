"""The embedded demo data: synthetic CT-like and X-ray-like images, laid out like the real sets.

COVID images carry patchy ground-glass opacities in the lung fields; non-COVID images are clear
lungs or (X-ray) a denser, one-sided pneumonia-like patch, so brightness alone does not give the
class away. CT-like files are numbered series: consecutive numbers are slices of one synthetic
patient that change slowly, and a new patient starts abruptly, as in the SARS-CoV-2 CT set.
Everything is drawn from `synth.seed`: the same parameters give byte-identical files.

A small "second site" per modality (ct-site2/, xray-site2/) is the default external test set: the
same classes from the same generator, other patients, and another scanner's look (intensity and
contrast, more noise, a little blur, a wider field of view: the CT slice inside a round scanner
field with the table below, the film with collimator borders and a side marker).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from covidtl.config import SynthConfig

CT_FOLDERS = {"covid": ("COVID", "Covid"), "non_covid": ("non-COVID", "Non-Covid")}
XRAY_FOLDERS = {"covid": ("Covid",), "non_covid": ("Normal", "Viral Pneumonia")}
XRAY_TEST_FRACTION = 0.2
# Random-stream keys of the second site: other numbers than the first site's 1, 2, 3 draw other
# patients, so no second-site image is a near-duplicate of a training image.
SITE2_CT_PATIENT, SITE2_CT_SLICE, SITE2_XRAY, SITE2_LOOK = 11, 12, 13, 14


def generate(cfg: SynthConfig, out: str | Path | None = None) -> dict[str, int]:
    """Write <out>/ct, xray, ct-site2 and xray-site2 afresh; returns the number of files per folder."""
    root = Path(out or cfg.out)
    for sub in ("ct", "xray", "ct-site2", "xray-site2"):
        shutil.rmtree(root / sub, ignore_errors=True)
    return {
        "ct": write_ct(cfg, root / "ct"),
        "xray": write_xray(cfg, root / "xray"),
        "ct-site2": write_ct_site2(cfg, root / "ct-site2"),
        "xray-site2": write_xray_site2(cfg, root / "xray-site2"),
    }


def write_ct(cfg: SynthConfig, root: Path) -> int:
    """<root>/COVID/Covid (N).png and <root>/non-COVID/Non-Covid (N).png, N = 1, 2, ..."""
    count = 0
    for code, (label, (folder, prefix)) in enumerate(CT_FOLDERS.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        n_patients = -(-cfg.images_per_class // cfg.slices_per_patient)
        number = 0
        for p in range(n_patients):
            patient = _ct_patient(np.random.default_rng([cfg.seed, 1, code, p]), label == "covid")
            slices = min(cfg.slices_per_patient, cfg.images_per_class - number)
            for s in range(slices):
                rng = np.random.default_rng([cfg.seed, 2, code, p, s])
                t = (s + 0.5) / cfg.slices_per_patient
                image = _ct_slice(patient, t, cfg.size, rng)
                number += 1
                # Most real CT files are RGBA, some RGB: keep both modes in the demo too.
                mode = "RGBA" if number % 3 else "RGB"
                image.convert(mode).save(root / folder / f"{prefix} ({number}).png")
                count += 1
    return count


def write_xray(cfg: SynthConfig, root: Path) -> int:
    """<root>/{train,test}/{Covid,Normal,Viral Pneumonia}/NNN.(jpeg|png)."""
    count = 0
    for code, (label, folders) in enumerate(XRAY_FOLDERS.items()):
        for f, folder in enumerate(folders):
            n = cfg.images_per_class // len(folders) + (f < cfg.images_per_class % len(folders))
            n_test = max(1, round(n * XRAY_TEST_FRACTION))
            for i in range(n):
                rng = np.random.default_rng([cfg.seed, 3, code, f, i])
                image = _xray(folder, cfg.size, rng)
                part = "test" if i < n_test else "train"
                target = root / part / folder
                target.mkdir(parents=True, exist_ok=True)
                # Mixed formats and modes, as in the real set: greyscale JPEG and RGB PNG.
                if i % 4 == 3:
                    image.convert("RGB").save(target / f"{i + 1:03d}.png")
                else:
                    image.save(target / f"{i + 1:03d}.jpeg", quality=92)
                count += 1
    return count


def write_ct_site2(cfg: SynthConfig, root: Path) -> int:
    """<root>/COVID/img<N>.jpg and <root>/non-COVID/img<N>.jpg (N = 0, 1, ...), as ct-external."""
    count = 0
    n = cfg.site2_images_per_class
    for code, (label, (folder, _)) in enumerate(CT_FOLDERS.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        number = 0
        for p in range(-(-n // cfg.slices_per_patient)):
            patient = _ct_patient(np.random.default_rng([cfg.seed, SITE2_CT_PATIENT, code, p]), label == "covid")
            for s in range(min(cfg.slices_per_patient, n - p * cfg.slices_per_patient)):
                rng = np.random.default_rng([cfg.seed, SITE2_CT_SLICE, code, p, s])
                t = (s + 0.5) / cfg.slices_per_patient
                image = _site2_ct(_ct_slice(patient, t, cfg.size, rng), cfg.size, rng)
                image.convert("RGB").save(root / folder / f"img{number}.jpg", quality=90)
                number += 1
                count += 1
    return count


def write_xray_site2(cfg: SynthConfig, root: Path) -> int:
    """<root>/{Covid,Normal,Viral Pneumonia}/site2-NNN.png: one folder per class, no train/test."""
    count = 0
    for code, (label, folders) in enumerate(XRAY_FOLDERS.items()):
        for f, folder in enumerate(folders):
            n = cfg.site2_images_per_class // len(folders) + (f < cfg.site2_images_per_class % len(folders))
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([cfg.seed, SITE2_XRAY, code, f, i])
                _site2_xray(_xray(folder, cfg.size, rng), cfg.size, rng).save(root / folder / f"site2-{i + 1:03d}.png")
                count += 1
    return count


# --------------------------------------------------------------------------- drawing


def _ct_patient(rng: np.random.Generator, covid: bool) -> dict:
    """What stays fixed (or drifts slowly) across one patient's slices."""
    return {
        "scale": rng.uniform(0.55, 1.0, size=2),  # crop size relative to synth.size
        "pose": (rng.uniform(-15, 15), rng.uniform(-0.08, 0.08, size=2)),  # rotation, shift
        "body": rng.uniform(0.36, 0.48, size=2),
        "lung": rng.uniform(0.12, 0.2, size=2),
        "lung_gap": rng.uniform(0.17, 0.27),
        "tissue": rng.uniform(0.5, 0.65),
        "air": rng.uniform(0.05, 0.2),
        "patches": _patches(rng, int(rng.integers(3, 7))) if covid else [],
        "nodules": _patches(rng, int(rng.integers(0, 3))),
    }


def _patches(rng: np.random.Generator, n: int) -> list[tuple[float, ...]]:
    # (side, angle, radius within the lung, size, strength): mostly peripheral, like GGOs.
    return [
        (rng.choice([-1, 1]), rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.9),
         rng.uniform(0.025, 0.05), rng.uniform(0.12, 0.22))
        for _ in range(n)
    ]


def _ct_slice(pt: dict, t: float, size: int, rng: np.random.Generator) -> Image.Image:
    """One axial slice at depth t in [0, 1] of the patient's series."""
    w, h = (np.round(pt["scale"] * size * (0.92 + 0.08 * np.sin(np.pi * t)))).astype(int)
    y, x = np.mgrid[0:h, 0:w]
    u, v = (x - w / 2) / w, (y - h / 2) / h
    img = np.zeros((h, w))
    body = (u / pt["body"][0]) ** 2 + (v / pt["body"][1]) ** 2 < 1
    img[body] = pt["tissue"]
    # Lungs grow from apex to mid-chest and shrink again: the slow change along the series.
    grow = 0.55 + 0.45 * np.sin(np.pi * (0.1 + 0.8 * t))
    lung_mask = np.zeros_like(body)
    for side in (-1, 1):
        cu = side * pt["lung_gap"]
        lu, lv = (u - cu) / (pt["lung"][0] * grow + 1e-6), v / (pt["lung"][1] * 1.6 * grow + 1e-6)
        lung_mask |= lu**2 + lv**2 < 1
    img[lung_mask] = pt["air"]
    img += _vessels(rng, lung_mask, (h, w))
    for side, angle, radius, extent, strength in pt["patches"]:
        cu = side * pt["lung_gap"] + radius * pt["lung"][0] * grow * np.cos(angle)
        cv = radius * pt["lung"][1] * 1.6 * grow * np.sin(angle) + 0.05 * (t - 0.5)
        blob = np.exp(-(((u - cu) ** 2 + (v - cv) ** 2) / (2 * extent**2)))
        mottle = 0.6 + 0.4 * _smooth_noise(rng, (h, w), 3)
        img += strength * blob * mottle * lung_mask
    for side, angle, radius, _, _ in pt["nodules"]:
        cu = side * pt["lung_gap"] + radius * pt["lung"][0] * grow * np.cos(angle)
        cv = radius * pt["lung"][1] * 1.6 * grow * np.sin(angle)
        img += 0.35 * (((u - cu) ** 2 + (v - cv) ** 2) < 0.012**2)
    img += rng.normal(0, 0.03, img.shape)
    angle, shift = pt["pose"]
    return _pose(_to_image(img, blur=0.8), angle + 2 * t, shift)


def _xray(folder: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A frontal chest film: dark lung fields, ribs, spine and heart; opacities by class."""
    y, x = np.mgrid[0:size, 0:size]
    u, v = (x - size / 2) / size, (y - size / 2) / size
    img = 0.25 + 0.35 * np.exp(-(u**2) / 0.08)  # soft tissue, brighter at the midline
    lungs = np.zeros_like(img, dtype=bool)
    cu, lw, lh = rng.uniform(0.15, 0.23), rng.uniform(0.09, 0.15), rng.uniform(0.26, 0.38)
    for side in (-1, 1):
        lungs |= ((u - side * cu) / lw) ** 2 + ((v - 0.02) / lh) ** 2 < 1
    air = rng.uniform(0.08, 0.18)
    img[lungs] = air
    ribs = 0.06 * (np.sin((v + 0.15 * u**2) * rng.uniform(38, 46) + rng.uniform(0, 6)) > 0.6)
    img += ribs * lungs
    img += 0.5 * (np.abs(u) < 0.035)  # spine
    hu, hv = rng.uniform(0.1, 0.16), rng.uniform(0.12, 0.2)
    img += 0.35 * (((u + 0.05) / hu) ** 2 + ((v - 0.15) / hv) ** 2 < 1)  # heart
    img += _vessels(rng, lungs, img.shape, density=0.004)
    if folder == "Covid":  # bilateral, peripheral, lower-zone ground glass
        for side in (-1, 1):
            for _ in range(int(rng.integers(1, 4))):
                pu = side * (cu + lw * rng.uniform(0.2, 0.8))
                pv = rng.uniform(0.0, 0.3)
                blob = np.exp(-((u - pu) ** 2 + (v - pv) ** 2) / (2 * rng.uniform(0.04, 0.07) ** 2))
                img += rng.uniform(0.14, 0.26) * blob * (0.6 + 0.4 * _smooth_noise(rng, img.shape, 4)) * lungs
    elif folder == "Viral Pneumonia":  # one denser, perihilar patch on one side
        side = rng.choice([-1, 1])
        pu, pv = side * (cu - lw * 0.3), rng.uniform(-0.05, 0.15)
        blob = np.exp(-((u - pu) ** 2 + (v - pv) ** 2) / (2 * 0.06**2))
        img += rng.uniform(0.2, 0.35) * blob * lungs
    img *= rng.uniform(0.8, 1.1) + rng.uniform(-0.3, 0.3) * v  # exposure and its gradient vary
    img += rng.normal(0, 0.035, img.shape)
    pose = rng.uniform(-8, 8), rng.uniform(-0.08, 0.08, size=2)
    return _pose(_to_image(img, blur=1.0), *pose)


def _site2_ct(slice_: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Another scanner: the cropped slice shrunk into a round field of view over a table, a softer
    window (brighter, lower contrast), a little blur and more noise, on a square canvas."""
    inner = max(8, round(size * 0.62))
    scale = inner / max(slice_.size)
    body = slice_.resize((max(1, round(slice_.width * scale)), max(1, round(slice_.height * scale))),
                         Image.BILINEAR)
    y, x = np.mgrid[0:size, 0:size]
    r = np.hypot(x - size / 2, y - size / 2) / (size / 2)
    img = np.full((size, size), 0.12)  # air inside the field, brighter than the first site's black
    table = (y > size * 0.8) & (y < size * 0.86)
    img[table] = 0.55
    top, left = (size - body.height) // 2 - round(size * 0.04), (size - body.width) // 2
    patch = np.asarray(body, dtype=np.float64) / 255
    region = img[top:top + body.height, left:left + body.width]
    img[top:top + body.height, left:left + body.width] = np.maximum(region, patch)
    img = 0.15 + 0.7 * img ** 0.8  # another window: lifted blacks, compressed whites
    img += rng.normal(0, 0.06, img.shape)
    img[r > 0.96] = 0.0  # outside the scanner's round field
    return _to_image(img, blur=1.2)


def _site2_xray(film: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Another X-ray room: harder exposure (brighter, flatter), more noise, collimator borders and
    a bright side marker; the film itself a little smaller and off-centre."""
    inner = round(size * 0.82)
    small = np.asarray(film.resize((inner, inner), Image.BILINEAR), dtype=np.float64) / 255
    img = np.zeros((size, size))
    top, left = int(rng.integers(0, size - inner + 1)), int(rng.integers(0, size - inner + 1))
    img[top:top + inner, left:left + inner] = 0.2 + 0.65 * small
    img += rng.normal(0, 0.07, img.shape)
    m = max(3, size // 16)
    img[top + 2:top + 2 + m, left + 2:left + 2 + m] = 0.95  # the side marker
    return _to_image(img, blur=1.1)


def _vessels(rng: np.random.Generator, mask: np.ndarray, shape, density: float = 0.006) -> np.ndarray:
    dots = (rng.random(shape) < density) * rng.uniform(0.2, 0.45, shape)
    return np.asarray(Image.fromarray((dots * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.0)), dtype=np.float64) / 255 * 3 * mask


def _smooth_noise(rng: np.random.Generator, shape, blur: float) -> np.ndarray:
    noise = Image.fromarray((rng.random(shape) * 255).astype(np.uint8))
    smooth = np.asarray(noise.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64) / 255
    return (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)


def _pose(image: Image.Image, angle: float, shift: np.ndarray) -> Image.Image:
    """Patients lie differently on the table: rotate and shift the whole picture."""
    dx, dy = (shift * image.size).round().astype(int)
    return image.rotate(angle, resample=Image.BILINEAR, translate=(int(dx), int(dy)))


def _to_image(img: np.ndarray, blur: float) -> Image.Image:
    grey = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return grey.filter(ImageFilter.GaussianBlur(blur))
