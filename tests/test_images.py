"""Image folders: scanning, captions (HF imagefolder conventions + sidecars), decoding, device transforms."""

import io
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import make_image_folder, photo, save_image
from PIL import Image

from latentpatch.data import images
from latentpatch.data.images import decode_bytes, decode_file, read_captions, scan_images
from latentpatch.data.transforms import as_size, check_resolution, cover_size, covers, resize_center_crop
from latentpatch.errors import UserError


def test_scan_finds_every_image_extension_recursively_and_ignores_other_files(tmp_path):
    make_image_folder(tmp_path, n=5)  # png jpg webp bmp tiff
    save_image(photo(0, 16), tmp_path / "sub" / "deep" / "x.JPEG")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "metadata.jsonl").write_text("")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    save_image(photo(0, 16), tmp_path / ".cache" / "y.png")
    assert scan_images(tmp_path) == [
        "img_000.png", "img_001.jpg", "img_002.webp", "img_003.bmp", "img_004.tiff", "sub/deep/x.JPEG",
    ]


def test_scan_leaves_out_the_store_folder_inside_the_images(tmp_path):
    make_image_folder(tmp_path, n=2)
    save_image(photo(0, 16), tmp_path / "store" / "z.png")
    assert scan_images(tmp_path, exclude=tmp_path / "store") == ["img_000.png", "img_001.jpg"]


def test_captions_from_jsonl_csv_in_subfolder_and_sidecar(tmp_path):
    make_image_folder(tmp_path, n=3, formats=("png",))
    make_image_folder(tmp_path / "b", n=2, formats=("jpg",))
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img_000.png", "text": "an astronaut"}) + "\n\n"
        + json.dumps({"file_name": "img_001.png", "text": "a cup", "other": 3}) + "\n"
        + json.dumps({"file_name": "gone.png", "text": "no such file"}) + "\n"
    )
    (tmp_path / "img_001.txt").write_text("sidecar loses to metadata")
    (tmp_path / "img_002.txt").write_text("  a cat \n")
    (tmp_path / "b" / "metadata.csv").write_text('file_name,text\nimg_000.jpg,"a rocket, tall"\n')
    files = scan_images(tmp_path)
    assert read_captions(tmp_path, files) == {
        "img_000.png": "an astronaut", "img_001.png": "a cup", "img_002.png": "a cat",
        "b/img_000.jpg": "a rocket, tall", "b/img_001.jpg": None,
    }


def test_metadata_without_text_column_gives_no_captions(tmp_path):
    make_image_folder(tmp_path, n=1, formats=("png",))
    (tmp_path / "metadata.csv").write_text("file_name,label\nimg_000.png,3\n")
    assert read_captions(tmp_path, ["img_000.png"]) == {"img_000.png": None}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("metadata.jsonl", '{"file_name": "a.png"}\n{oops\n', "line 2 is not valid JSON"),
        ("metadata.jsonl", '{"text": "x"}\n', "line 1 has no 'file_name'"),
        ("metadata.csv", "name,text\na.png,x\n", "no 'file_name' column"),
    ],
)
def test_malformed_metadata_is_a_user_error_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message) as e:
        read_captions(tmp_path, ["a.png"])
    assert name in str(e.value)


def test_both_metadata_files_in_one_folder_is_a_user_error(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,text\n")
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(UserError, match="keep one"):
        read_captions(tmp_path, [])


def test_rgb_png_decodes_exactly(tmp_path):
    image = photo(1, (40, 30))
    decoded = decode_file(save_image(image, tmp_path / "a.png"))
    assert decoded.skip is None and decoded.mode == "RGB"
    assert decoded.image.dtype == torch.uint8 and decoded.image.shape == (3, 30, 40)
    assert torch.equal(decoded.image, torch.from_numpy(np.array(image)).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16"])
def test_other_modes_convert_to_rgb_and_report_their_mode(tmp_path, mode):
    suffix = "tiff" if mode == "CMYK" else "png"
    path = save_image(photo(0, 24), tmp_path / f"a.{suffix}", mode)
    decoded = decode_file(path)
    assert decoded.skip is None and decoded.mode == Image.open(path).mode
    assert decoded.image.shape == (3, 24, 24) and decoded.image.dtype == torch.uint8


def test_transparent_pixels_become_white_and_grey_stays_grey(tmp_path):
    rgba = decode_file(save_image(photo(0, 32), tmp_path / "a.png", "RGBA")).image
    assert (rgba[:, :, :8] == 255).all()  # the helper makes the left quarter transparent
    grey = decode_file(save_image(photo(4, 32), tmp_path / "g.png", "L")).image
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_sixteen_bit_grey_is_scaled_not_clipped():
    b = io.BytesIO()
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(b, "PNG")
    image, mode = decode_bytes(b.getvalue())
    assert mode.startswith("I") and image[0, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied():
    b = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    photo(0, (40, 20)).save(b, "JPEG", exif=exif)
    image, _ = decode_bytes(b.getvalue())
    assert image.shape == (3, 40, 20)


def test_bad_files_are_skip_reasons_not_exceptions(tmp_path):
    good = save_image(photo(0, 32), tmp_path / "good.jpg").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "half.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.png").write_text("not an image at all")
    assert decode_file(tmp_path / "empty.png").skip == images.EMPTY
    assert decode_file(tmp_path / "half.jpg").skip == images.TRUNCATED
    assert decode_file(tmp_path / "text.png").skip == images.NOT_AN_IMAGE
    assert decode_file(tmp_path / "missing.png").skip == images.UNREADABLE
    assert decode_file(tmp_path / "text.png").sha256 is not None  # still hashed: a rerun recognises it


def test_resolution_helpers():
    assert as_size(64) == (64, 64) and as_size((32, 48)) == (32, 48)
    with pytest.raises(UserError, match="positive"):
        as_size(0)
    check_resolution((64, 64), 8)
    with pytest.raises(UserError, match="resolution 60 is not a multiple of the autoencoder's factor 8"):
        check_resolution((60, 60), 8)
    assert cover_size(30, 40, (20, 20)) == (20, 27) and cover_size(40, 30, (20, 20)) == (27, 20)
    assert covers(20, 30, (20, 20)) and not covers(19, 30, (20, 20))


def test_resize_center_crop_matches_torchvision_on_each_image_of_a_mixed_batch():
    sizes = [(48, 64), (64, 48), (32, 32), (48, 64)]  # (width, height); two share a size
    raw = [torch.from_numpy(np.array(photo(i, s))).permute(2, 0, 1) for i, s in enumerate(sizes)]
    out = resize_center_crop(raw, (32, 32))
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    for i, image in enumerate(raw):
        h, w = image.shape[-2:]
        ref = TF.resize(image[None].float(), list(cover_size(h, w, (32, 32))), TF.InterpolationMode.BICUBIC, antialias=True)
        ref = TF.center_crop(ref, [32, 32]).clamp(0, 255) / 127.5 - 1
        torch.testing.assert_close(out[i], ref[0])
    torch.testing.assert_close(out[2], raw[2].float() / 127.5 - 1)  # already the right size: untouched


def test_resize_of_a_flat_image_stays_flat_and_in_range():
    flat = torch.full((3, 50, 70), 200, dtype=torch.uint8)
    out = resize_center_crop([flat], (16, 16))
    torch.testing.assert_close(out, torch.full((1, 3, 16, 16), 200 / 127.5 - 1))
    noisy = resize_center_crop([torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)], (8, 8))
    assert noisy.min() >= -1 and noisy.max() <= 1
