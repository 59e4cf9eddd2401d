"""Multispectral and false-colour images -> 8-bit RGB: keep three bands, stretch each to 0..255.

Field cameras (MicaSense, Parrot Sequoia, DJI multispectral) and satellite products store 4-10 bands
of 12- to 16-bit values in (Geo)TIFF files; models take 8-bit RGB. A converter given a
:class:`BandSelection` reads every band of an image, keeps three (true colour ``3,2,1``, false colour
such as ``nir,red,green``) or one (shown as grey), stretches each on its own to 0..255 and stores the
result as lossless PNG. Masks keep their pixel grid: band selection never changes the image size.

* Bands are numbered from 1, as GDAL numbers them, or named: by ``names`` (the file's bands in
  order) or by the band descriptions GDAL writes into a TIFF (``GDAL_METADATA``). Names are
  compared case-insensitively.
* Stretch: each band's ``percentiles`` (default 2 and 98) of the image map to 0 and 255 and values
  outside are clipped; or a fixed ``value_range`` maps to 0..255 for every image and band (e.g.
  ``0 10000`` for reflectance scaled by 10000), which keeps brightness comparable across images.
* ``nodata`` pixels (and NaN) are left out of the percentiles and written as 0.

TIFF files are read with ``tifffile``: Pillow reads 4-band 16-bit TIFFs as 8-bit RGB (dropping a
band and the low bits) and cannot open 5-band ones. Other formats (16-bit PNG, ...) are read with
Pillow.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.convert.common import InputError, SkipItem
from data_pipelines.schema import encode_image

TIFF_SUFFIXES = (".tif", ".tiff")
GDAL_METADATA_TAG = 42112


@dataclass(frozen=True)
class BandSelection:
    """Which bands of a multi-band image become RGB, and how they are stretched to 8 bits.

    Attributes:
        bands: one or three bands, numbered from 1 or named (``(3, 2, 1)``, ``("nir", "red", "green")``).
        names: the file's band names in order (default: the TIFF's GDAL band descriptions).
        percentiles: (low, high) per-image, per-band percentiles mapped to 0 and 255.
        value_range: fixed (min, max) mapped to 0 and 255 instead of percentiles.
        nodata: value marking pixels without data (left out of the percentiles, written as 0).
    """

    bands: tuple[int | str, ...]
    names: tuple[str, ...] = ()
    percentiles: tuple[float, float] = (2.0, 98.0)
    value_range: tuple[float, float] | None = None
    nodata: float | None = None

    def __post_init__(self) -> None:
        if len(self.bands) not in (1, 3):
            raise InputError(f"--bands needs one or three bands, got {len(self.bands)}: {list(self.bands)}")
        if any(isinstance(b, int) and b < 1 for b in self.bands):
            raise InputError(f"band numbers start at 1, got {list(self.bands)}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise InputError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise InputError(f"stretch range must satisfy min < max, got {list(self.value_range)}")
        lowered = [n.lower() for n in self.names]
        if len(set(lowered)) != len(lowered):
            raise InputError(f"--band-names repeats a name: {list(self.names)}")

    def indices(self, available: int, names: list[str], path: Path) -> list[int]:
        """0-based indices of the selected bands in an image with ``available`` bands named ``names``."""
        names = [n.lower() for n in (self.names or names)]
        if self.names and len(self.names) != available:
            raise SkipItem("band names do not match the image",
                           f"{path} has {available} bands, --band-names lists {len(self.names)}")
        out = []
        for band in self.bands:
            if isinstance(band, int):
                if band > available:
                    raise SkipItem("band not in image",
                                   f"{path} has {available} bands, asked for band {band}")
                out.append(band - 1)
            elif band.lower() in names:
                out.append(names.index(band.lower()))
            else:
                known = f"its bands are named {names}" if names else \
                    "it names no bands (give --band-names or band numbers)"
                raise SkipItem("band not in image", f"{path} has no band {band!r}: {known}")
        return out

    def to_rgb(self, path: Path) -> np.ndarray:
        """(H, W, 3) uint8 image of the selected, stretched bands of the file at ``path``."""
        bands, names = read_bands(path)
        picked = bands[..., self.indices(bands.shape[-1], names, path)]
        rgb = stretch_to_uint8(picked, self.percentiles, self.value_range, self.nodata)
        return np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb

    def read_image(self, path: Path) -> tuple[bytes, str, int, int]:
        """``(PNG bytes, "png", width, height)``: a drop-in for ``convert.common.read_image``."""
        rgb = self.to_rgb(path)
        return encode_image(rgb, "png"), "png", rgb.shape[1], rgb.shape[0]

    def to_json(self) -> dict[str, Any]:
        """The settings, as recorded in a shard set's manifest."""
        return {"bands": list(self.bands), "names": list(self.names), "percentiles": list(self.percentiles),
                "value_range": list(self.value_range) if self.value_range else None, "nodata": self.nodata}


def read_bands(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """``((H, W, C) array in the file's dtype, band names or [])`` of an image file; raises SkipItem."""
    path = Path(path)
    if not path.is_file():
        raise SkipItem("missing image file", str(path))
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(path)
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB") if img.mode == "P" else img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SkipItem("unreadable image", f"{path}: {err}") from err
    return (array[..., None] if array.ndim == 2 else array), []


def _read_tiff(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        import tifffile
    except ImportError:
        raise InputError(f"reading the bands of {path} needs tifffile: pip install tifffile") from None
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array, axes, metadata = series.asarray(), series.axes, tif.gdal_metadata
    except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as err:
        raise SkipItem("unreadable image", f"{path}: {err}") from err
    extra = [i for i, axis in enumerate(axes) if axis not in "YX" and array.shape[i] > 1]
    if "Y" not in axes or "X" not in axes or len(extra) > 1:
        raise SkipItem("unsupported TIFF layout",
                       f"{path} has axes {axes!r} with shape {list(array.shape)}; "
                       "expected Y, X and one band axis")
    order = [axes.index("Y"), axes.index("X"), *extra]
    array = array.transpose(order + [i for i in range(array.ndim) if i not in order])
    array = array.reshape(array.shape[0], array.shape[1], -1)
    return array, _gdal_band_names(metadata, array.shape[-1])


def _gdal_band_names(metadata: str | None, count: int) -> list[str]:
    """Band descriptions from GDAL's XML metadata (``<Item name="DESCRIPTION" sample="0">Red</Item>``)."""
    if not metadata:
        return []
    try:
        root = ET.fromstring(metadata)
    except ET.ParseError:
        return []
    names = [""] * count
    for item in root.iter("Item"):
        sample = item.get("sample")
        if item.get("name") == "DESCRIPTION" and (sample or "").isdigit() and int(sample) < count:
            names[int(sample)] = (item.text or "").strip()
    return names if all(names) else []


def stretch_to_uint8(bands: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0),
                     value_range: tuple[float, float] | None = None,
                     nodata: float | None = None) -> np.ndarray:
    """(H, W, C) array of any numeric dtype -> (H, W, C) uint8, each band stretched on its own.

    Args:
        bands: the image's bands, last axis.
        percentiles: (low, high) percentiles of each band's valid pixels mapped to 0 and 255.
        value_range: fixed (min, max) mapped to 0 and 255 instead (same for every band).
        nodata: pixels of this value, and NaN, are left out of the percentiles and written as 0.
    """
    out = np.zeros(bands.shape, np.uint8)
    for k in range(bands.shape[-1]):
        band = bands[..., k].astype(np.float64)
        valid = np.isfinite(band) if nodata is None else np.isfinite(band) & (band != nodata)
        if not valid.any():
            continue
        low, high = value_range if value_range is not None else np.percentile(band[valid], percentiles)
        scaled = (band - low) * 255.0 / max(high - low, np.finfo(np.float64).tiny)
        out[..., k] = np.where(valid, np.rint(np.clip(np.nan_to_num(scaled), 0, 255)), 0)
    return out


def parse_bands(text: str) -> tuple[int | str, ...]:
    """``"3,2,1"`` -> ``(3, 2, 1)``; ``"nir,red,green"`` -> names; numbers and names may mix."""
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated band numbers or names, got {text!r}")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def add_band_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--bands`` options every converter shares (multi-band / false-colour images)."""
    group = parser.add_argument_group("multi-band images (multispectral TIFF -> 8-bit RGB PNG)")
    group.add_argument("--bands", type=parse_bands, metavar="B,B,B",
                       help="keep these three bands (or one, as grey), numbered from 1 or named: "
                            "'3,2,1' or 'nir,red,green' (default: images are used as they are)")
    group.add_argument("--band-names", type=lambda t: tuple(p.strip() for p in t.split(",")), default=(),
                       metavar="NAME,...",
                       help="names of the file's bands in order, for --bands by name "
                            "(default: the band descriptions GDAL stores in the TIFF)")
    group.add_argument("--stretch-percentiles", type=float, nargs=2, default=(2.0, 98.0),
                       metavar=("LOW", "HIGH"), help="per-image, per-band percentiles mapped to 0 and 255")
    group.add_argument("--stretch-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="fixed value range mapped to 0..255 for every image and band, instead of "
                            "percentiles (keeps brightness comparable across images)")
    group.add_argument("--nodata", type=float, help="pixel value meaning 'no data' (ignored, written as 0)")


def band_selection_from_args(args: argparse.Namespace) -> BandSelection | None:
    """The :class:`BandSelection` of :func:`add_band_arguments` options, or None without ``--bands``."""
    if args.bands is None:
        if args.band_names or args.stretch_range is not None or args.nodata is not None:
            raise InputError("--band-names, --stretch-range and --nodata need --bands")
        return None
    return BandSelection(bands=args.bands, names=tuple(args.band_names),
                         percentiles=tuple(args.stretch_percentiles),
                         value_range=tuple(args.stretch_range) if args.stretch_range else None,
                         nodata=args.nodata)

