"""Image-caption datasets in the Hugging Face "imagefolder" layout.

    folder/
      metadata.jsonl      one JSON object per line: {"file_name": "0001.png", "text": "a red circle"}
      0001.png ...        paths in file_name are relative to the folder (subfolders allowed)

The whole folder is checked when the dataset is opened, so a typo or a missing file fails at once instead of
hours into a cache or training pass.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import SafepruneError

METADATA = "metadata.jsonl"
_FORMAT_HINT = 'one JSON object per line, like {"file_name": "0001.png", "text": "a caption"}'


class ImageFolder:
    """An imagefolder dataset: `len(ds)` items, `ds.captions[i]`, `ds.load_image(i, resolution)`.

    Empty captions ("text": "") are allowed (caption dropout trains on them); a line without a "text" key is not.
    Raises SafepruneError for a missing folder or metadata.jsonl, a malformed line, missing images or no items.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise SafepruneError(f"image folder {self.root} does not exist; pass a folder holding {METADATA} and images")
        if not self.root.is_dir():
            raise SafepruneError(f"image folder {self.root} is a file; pass the folder that holds {METADATA}")
        self.metadata_path = self.root / METADATA
        if not self.metadata_path.is_file():
            others = [n for n in ("metadata.csv", "metadata.json") if (self.root / n).exists()]
            extra = f" (found {others[0]}, which is not supported: convert it to {METADATA})" if others else ""
            raise SafepruneError(
                f"image folder {self.root} has no {METADATA}{extra}; write one with {_FORMAT_HINT}"
            )

        self.files: list[str] = []
        self.captions: list[str] = []
        raw = self.metadata_path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SafepruneError(f"{self.metadata_path} is not UTF-8 text ({e}); re-save it as UTF-8") from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry nothing
            where = f"{self.metadata_path} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SafepruneError(f"{where} is not valid JSON ({e.msg}); each line must be {_FORMAT_HINT}") from None
            if not isinstance(record, dict):
                raise SafepruneError(f"{where} is a JSON {type(record).__name__}; each line must be {_FORMAT_HINT}")
            missing = [key for key in ("file_name", "text") if key not in record]
            if missing:
                hint = ' (use "text": "" for an image without caption)' if "text" in missing else ""
                raise SafepruneError(
                    f"{where} has no {' or '.join(repr(k) for k in missing)} key{hint}; each line must be {_FORMAT_HINT}"
                )
            file_name, caption = record["file_name"], record["text"]
            if not isinstance(file_name, str) or not file_name:
                raise SafepruneError(f"{where}: file_name must be a non-empty string, got {file_name!r}")
            if not isinstance(caption, str):
                raise SafepruneError(f'{where}: text must be a string (use "" for no caption), got {caption!r}')
            if Path(file_name).is_absolute():
                raise SafepruneError(f"{where}: file_name {file_name!r} is absolute; make it relative to {self.root}")
            self.files.append(file_name)
            self.captions.append(caption)

        if not self.files:
            raise SafepruneError(f"{self.metadata_path} is empty: the dataset has no images; add lines {_FORMAT_HINT}")
        absent = [name for name in dict.fromkeys(self.files) if not (self.root / name).is_file()]
        if absent:
            shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise SafepruneError(
                f"{len(absent)} image(s) listed in {self.metadata_path} are missing from {self.root}: {shown}; "
                f"add the files or remove their lines"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images)"

    def image_path(self, i: int) -> Path:
        return self.root / self.files[i]

    def load_image(self, i: int, resolution: int) -> torch.Tensor:
        """Image i as a float32 tensor (3, resolution, resolution) with values in [-1, 1].

        Converted to RGB, resized (bilinear) so its shorter side is `resolution`, then center-cropped.
        """
        from PIL import Image

        if resolution <= 0:
            raise SafepruneError(f"resolution must be a positive number of pixels, got {resolution}")
        path = self.image_path(i)
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as e:  # PIL raises several types for unreadable files
            raise SafepruneError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or remove it") from None
        (new_w, new_h), (top, left) = resized_and_crop(img.size, resolution)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), Image.BILINEAR)
        img = img.crop((left, top, left + resolution, top + resolution))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def size_and_crop(self, i: int, resolution: int) -> tuple[int, int, int, int]:
        """(original height, original width, crop top, crop left) of image i as `load_image` crops it: SDXL's
        size and crop conditioning (crop coordinates in the resized image, as SDXL was trained)."""
        from PIL import Image

        path = self.image_path(i)
        try:
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
        except Exception as e:  # PIL raises several types for unreadable files
            raise SafepruneError(f"cannot read image {path} ({type(e).__name__}: {e}); replace or remove it") from None
        _, (top, left) = resized_and_crop((width, height), resolution)
        return height, width, top, left

    def fingerprint(self) -> str:
        """A 16-hex-digit hash of metadata.jsonl's bytes and every image's size and mtime_ns (contents unread)."""
        hasher = hashlib.sha256(b"safeprune-imagefolder-v1")
        hasher.update(self.metadata_path.read_bytes())
        for name in dict.fromkeys(self.files):
            st = (self.root / name).stat()
            hasher.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return hasher.hexdigest()[:16]


def resized_and_crop(size: tuple[int, int], resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) after resizing the shorter side to `resolution`, (top, left) of the centre crop)."""
    w, h = size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return (new_w, new_h), ((new_h - resolution) // 2, (new_w - resolution) // 2)
