"""Image files in and out for the command line, the server and fine-tuning: reading one image fully and safely
(`load_image`), --image_file_path's files, folders and globs (`expand_image_paths`), where drawings go
(`output_image_paths`, checked before the model loads) and saving them whole (`save_image`).

With several images, `load_image` runs per image, and a failure there becomes that image's error line. Checked by
tests/test_errors_images.py, test_many.py and test_cli.py.
"""

from __future__ import annotations

import glob
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from cli_checks import ImageError, OutputError, UsageError, log, one_line
from fileio import atomic_path


def load_image(path: str) -> Image.Image:
    """Open an image file fully (so truncation is caught here), apply EXIF orientation as transformers does.

    Raises ImageError for a missing path, a directory, an empty/unreadable/truncated file, one Pillow fails to
    decode for any reason (damaged data), or one above Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS;
    refused already at 1x, where Pillow only warns). An animated image gives its first frame, with a note on stderr.
    """
    p = Path(path)
    if not str(path):
        raise ImageError("no image given; pass --image_file_path FILE")
    try:
        st = p.stat()  # follows symlinks, as opening does
    except FileNotFoundError:
        dangling = " (a symlink to a missing file)" if p.is_symlink() else ""
        raise ImageError(f"image file {p} does not exist{dangling}; check --image_file_path") from None
    except OSError as e:  # ELOOP: a symlink loop; EACCES: a directory on the way we may not enter
        raise ImageError(f"image path {p} cannot be opened ({e.strerror}); check --image_file_path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"image path {p} is a directory; give an image file inside it")
    if not stat.S_ISREG(st.st_mode):
        # Reading a FIFO or socket would wait for a writer forever, /dev/zero never ends.
        raise ImageError(f"image path {p} is not a regular file (a FIFO, socket or device); give an image file")
    if st.st_size == 0:
        raise ImageError(f"image file {p} is empty (0 bytes); re-download or re-save it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()
                out = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"image file {p} is too large to decode safely ({str(e).split(',')[0]}); downscale it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels (PaliGemma sees at most 896x896 anyway)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{p} is not an image file Pillow can read; give a JPEG, PNG, GIF, WebP, BMP or TIFF file"
        ) from None
    except PermissionError:
        raise ImageError(f"image file {p} cannot be read (permission denied); check its permissions") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 — only Pillow runs in the try block
        # Pillow's decoders raise almost anything on damaged data: OSError, SyntaxError, struct.error, but also
        # TypeError (a TIFF page without ImageWidth), NotImplementedError (a DDS pixel format), KeyError, ...
        raise ImageError(
            f"image file {p} is truncated or corrupt ({one_line(e)}); re-download or re-save it"
        ) from None
    if frames > 1:
        log(f"note: {p.name} has {frames} frames; using the first")
    return out


def save_image(image: Image.Image, path: Path) -> None:
    """Save a drawing whole or not at all (fileio.atomic_path), in the format its extension names."""
    fmt = Image.registered_extensions()[path.suffix.lower()]  # output_image_paths allowed only known extensions
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format=fmt)
    except OSError as e:
        raise OutputError(f"cannot write --output_image {path} ({e.strerror or one_line(e)}); check the disk "
                          "space and the directory") from None


def expand_image_paths(spec: str | Sequence[str]) -> tuple[list[str], bool]:
    """--image_file_path -> (image paths in input order, whether the output is one JSON line per image).

    Each item is a file (kept even if unreadable: that image gets an error line), a directory (its files with an
    image extension, sorted by name, not recursive) or a glob such as "imgs/*.jpg" (quoted, so the shell leaves it;
    sorted). Several items, a directory or a glob mean JSON Lines even if they come to one image: the output format
    follows the command, not how many files happen to match.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    # What a directory contributes: files with an extension Pillow can open (.jpg, .png, .webp, .gif, .tif, ...).
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    many = len(items) > 1
    paths: list[str] = []
    for item in map(str, items):
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir()
                           if f.suffix.lower() in extensions and not f.name.startswith(".") and f.is_file())
            if not found:
                raise ImageError(f"image path {p} is a directory with no image files in it; give an image file or a "
                                 "directory of .jpg/.png/.webp/... images")
        elif not p.exists() and any(ch in item for ch in "*?["):
            found = sorted(f for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                raise ImageError(f"no files match --image_file_path {item}")
        else:
            paths.append(item)
            continue
        paths += found
        many = True
    return paths, many


def output_image_paths(output_image, image_paths: Sequence[str], many: bool) -> list[Path] | None:
    """--output_image -> where each image's drawing goes (None: no drawings), checked before the model loads.

    One image: PATH, a file name with an image extension in an existing directory. Several: PATH is an existing
    directory and image `x.jpg` is drawn to PATH/x.png (PNG keeps the thin box lines exact); the names must differ.
    An input image is never overwritten.
    """
    if output_image is None or output_image == "":
        return None
    out = Path(str(output_image))
    if many:
        if not out.is_dir():
            raise UsageError(f"--output_image {out} must be an existing directory when several images are given "
                             "(each drawing is saved there as <image name>.png)")
        targets = [out / (Path(p).stem + ".png") for p in image_paths]
        seen: dict[Path, str] = {}
        for target, src in zip(targets, image_paths, strict=True):
            if target in seen:
                raise UsageError(f"--output_image: {seen[target]} and {src} would both be drawn to {target}; rename "
                                 "one or run them separately")
            seen[target] = src
    else:
        if out.is_dir():
            raise UsageError(f"--output_image {out} is a directory; give a file name such as {out / 'boxes.png'}")
        fmt = Image.registered_extensions().get(out.suffix.lower())
        if fmt is None or fmt not in Image.SAVE:
            raise UsageError(f"--output_image {out}: Pillow cannot write {out.suffix or 'files without an extension'}; "
                             "use .png or .jpg")
        if not out.parent.is_dir():
            raise UsageError(f"--output_image {out}: directory {out.parent} does not exist")
        targets = [out]
    # O(N): the targets that exist, by (device, inode), then one stat per input image only if any exists (so a
    # fresh directory costs no stat of the images: an --image_list of millions is not walked here).
    existing: dict[tuple[int, int], Path] = {}
    for target in targets:
        try:
            st = target.stat()
        except OSError:  # absent (or a symlink loop, which the save then reports)
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UsageError(f"--output_image {target} exists and is not a regular file (a device, FIFO or socket); "
                             "give the path of an image file")
        if not os.access(target.parent, os.W_OK) or (st is not None and not os.access(target, os.W_OK)):
            raise UsageError(f"--output_image {target} is not writable; check the directory's permissions")
        if st is not None:
            existing[st.st_dev, st.st_ino] = target
    for src in image_paths if existing else ():
        try:
            st = os.stat(src)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in existing:
            raise UsageError(f"--output_image {existing[st.st_dev, st.st_ino]} is the input image {src}; give "
                             "another path")
    return targets
