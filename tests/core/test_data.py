"""Tests of image tables, the PNG codec and the real-user readers."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from core import data
from core.errors import DataError


def _random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _encoded(image: np.ndarray | Image.Image, image_format: str = "PNG") -> bytes:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format)
    return buffer.getvalue()


def _columns(n: int) -> dict[str, list]:
    return {
        "label": [i % 3 for i in range(n)],
        "class_name": [f"c{i % 3}" for i in range(n)],
        "group": ["train"] * n,
    }


def test_round_trip_keeps_pixels_labels_and_columns(tmp_path: Path):
    # given images written as (N, H, W, 3) arrays with metadata
    images = _random_images(5)
    data.write_images(tmp_path / "a.parquet", images, _columns(5))
    # when loaded back
    loaded = data.load_images(tmp_path / "a.parquet")
    # then pixels, labels and columns survive, in (N, 3, H, W) layout
    assert loaded.images.dtype == torch.uint8
    assert np.array_equal(loaded.images.permute(0, 2, 3, 1).numpy(), images)
    assert loaded.labels.tolist() == [0, 1, 2, 0, 1]
    assert loaded.labels.dtype == torch.int64
    assert loaded.table.column_names == ["sample_id", "label", "class_name", "group"]


def test_tensor_input_and_sample_ids(tmp_path: Path):
    # given images as an in-memory (N, 3, H, W) tensor
    images = torch.from_numpy(_random_images(3)).permute(0, 3, 1, 2)
    data.write_images(tmp_path / "t.parquet", images, _columns(3))
    table = pq.read_table(tmp_path / "t.parquet")
    # then the stored PNG decodes to the same pixels and its sha1 is the sample id
    for row, png in enumerate(table["image"].to_pylist()):
        assert np.array_equal(data.decode_image(png, "t"), images[row].permute(1, 2, 0).numpy())
        assert (
            table["sample_id"][row].as_py() == hashlib.sha1(png).hexdigest() == data.content_id(png)
        )
    assert table.schema.field("label").type == pa.int32()


def test_equal_pixels_give_equal_bytes():
    # given the same image encoded twice; then the PNG bytes are identical
    image = _random_images(1)[0]
    assert data.encode_png(image) == data.encode_png(image.copy())


def test_channel_first_arrays_are_rejected(tmp_path: Path):
    # given a numpy array in the tensor layout (N, 3, H, W); then the error names both layouts
    images = _random_images(2).transpose(0, 3, 1, 2)
    with pytest.raises(DataError, match=r"arrays as \(N, H, W, 3\)"):
        data.write_images(tmp_path / "c.parquet", images, _columns(2))


def test_iter_batches_streams_every_row_in_order(tmp_path: Path):
    # given a file of 7 images; when streamed in batches of 3
    data.write_images(tmp_path / "b.parquet", _random_images(7), _columns(7))
    batches = list(data.iter_batches(tmp_path / "b.parquet", batch_size=3))
    # then batches of 3, 3, 1 cover the file in order
    assert [len(b) for b in batches] == [3, 3, 1]
    whole = data.load_images(tmp_path / "b.parquet")
    assert torch.equal(torch.cat([b.images for b in batches]), whole.images)


def test_an_empty_writer_leaves_an_empty_schema_file(tmp_path: Path):
    # when a writer is closed without rows; then the file exists with the schema and no rows
    with data.ImageWriter(tmp_path / "empty.parquet"):
        pass
    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    assert len(data.load_images(tmp_path / "empty.parquet")) == 0


def test_writer_error_on_row_mismatch(tmp_path: Path):
    with pytest.raises(DataError, match="2 images but 3 metadata rows"):
        data.write_images(tmp_path / "m.parquet", _random_images(2), _columns(3))
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_decode_converts_modes_to_rgb(mode: str):
    # given a JPEG/PNG in another colour mode; when decoded; then it is (H, W, 3) uint8
    image = Image.fromarray(_random_images(1, 8)[0]).convert(mode)
    decoded = data.decode_image(_encoded(image, "JPEG" if mode == "CMYK" else "PNG"), "x")
    assert decoded.shape == (8, 8, 3)
    assert decoded.dtype == np.uint8


def test_decode_rejects_non_images():
    with pytest.raises(DataError, match=r"notes\.txt: not a readable image"):
        data.decode_image(b"hello, not an image", "notes.txt")


def test_decode_rejects_truncated_png():
    png = data.encode_png(_random_images(1, 32)[0])
    with pytest.raises(DataError, match=r"cut\.png: not a readable image"):
        data.decode_image(png[: len(png) // 2], "cut.png")


def test_decode_rejects_degenerate_size():
    with pytest.raises(DataError, match=r"dot\.png: image is 1 x 1 pixels"):
        data.decode_image(_encoded(np.zeros((1, 1, 3), np.uint8)), "dot.png")


def test_load_images_names_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        data.load_images(tmp_path / "nope.parquet")


def _image_folder(root: Path) -> Path:
    """cat/ with two images of different sizes, dog/ with one grayscale JPEG."""
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    Image.fromarray(_random_images(1, 20)[0]).save(root / "cat" / "a.png")
    Image.fromarray(_random_images(1, 9, seed=1)[0]).save(root / "cat" / "b.png")
    Image.fromarray(_random_images(1, 12, seed=2)[0]).convert("L").save(root / "dog" / "c.jpg")
    return root


def test_read_image_folder_resizes_and_labels(tmp_path: Path):
    # given class folders with images of mixed size and mode
    root = _image_folder(tmp_path / "photos")
    # when read at 16 px
    images, class_names = data.read_image_folder(root, image_size=16)
    # then classes are the sorted folders and every image is (3, 16, 16)
    assert class_names == ["cat", "dog"]
    assert tuple(images.images.shape) == (3, 3, 16, 16)
    assert images.labels.tolist() == [0, 0, 1]
    assert images.table["source"].to_pylist() == ["cat/a.png", "cat/b.png", "dog/c.jpg"]


def test_read_image_folder_rejects_empty_class(tmp_path: Path):
    root = _image_folder(tmp_path / "photos")
    (root / "bird").mkdir()
    with pytest.raises(DataError, match=r"bird: class folder holds no images; add images"):
        data.read_image_folder(root, image_size=16)


def test_read_image_folder_names_corrupt_file(tmp_path: Path):
    root = _image_folder(tmp_path / "photos")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image.*replace it"):
        data.read_image_folder(root, image_size=16)


def test_read_image_folder_names_missing_file(tmp_path: Path):
    root = _image_folder(tmp_path / "photos")
    (root / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"gone\.png: cannot be read"):
        data.read_image_folder(root, image_size=16)


def _user_file(path: Path, labels: list) -> Path:
    images = [_encoded(image) for image in _random_images(len(labels), 10)]
    pq.write_table(pa.table({"picture": images, "kind": labels, "note": ["x"] * len(labels)}), path)
    return path


def test_read_user_parquet_maps_class_names(tmp_path: Path):
    # given a user Parquet with class-name labels in custom columns
    path = _user_file(tmp_path / "u.parquet", ["dog", "cat", "dog"])
    # when read with the model's class names
    images = data.read_user_parquet(
        path, "picture", "kind", class_names=["cat", "dog"], image_size=16
    )
    # then labels are indices, images resized, other columns kept, ids added
    assert images.labels.tolist() == [1, 0, 1]
    assert tuple(images.images.shape) == (3, 3, 16, 16)
    assert set(images.table.column_names) == {"note", "label", "sample_id"}


def test_read_user_parquet_errors_name_the_fix(tmp_path: Path):
    path = _user_file(tmp_path / "u.parquet", [0, 5, 1])
    missing = r"missing column\(s\) \['image', 'label'\].*pass image_column="
    with pytest.raises(DataError, match=missing):
        data.read_user_parquet(path)
    with pytest.raises(DataError, match=r"row 1: label 5 is not a class index \(0\.\.1\)"):
        data.read_user_parquet(path, "picture", "kind", class_names=["cat", "dog"])


def test_file_hash_follows_content(tmp_path: Path):
    # given two files; when one changes; then the hash changes
    (tmp_path / "a").write_bytes(b"one")
    (tmp_path / "b").write_bytes(b"two")
    before = data.file_hash([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "b").write_bytes(b"three")
    assert data.file_hash([tmp_path / "a", tmp_path / "b"]) != before
    assert len(before) == 64
