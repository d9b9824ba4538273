"""storyteller.images.load_image: every awkward or hostile input either converts correctly or is refused
with ImageError; each case is generated in tmp_path."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from storyteller.images import ImageError, load_image
from tests.helpers_images import jpeg_bytes, photo_like, png_bomb, write_bad_inputs, write_odd_inputs


def px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in img.getpixel(xy))


def close(a, b, tol=12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# -- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, words", [
    ("not_an_image.jpg", "not an image"),
    ("empty.png", "empty"),
    ("truncated.jpg", "truncated"),
    ("bomb_20000x20000.png", "megapixels"),
])
def test_bad_files_are_refused_with_a_clear_message(tmp_path, name, words):
    path = write_bad_inputs(tmp_path)[name]
    with pytest.raises(ImageError, match=words):
        load_image(path)
    with pytest.raises(ImageError, match=words):  # same answer from bytes and from a file object
        load_image(path.read_bytes())
    with open(path, "rb") as f, pytest.raises(ImageError, match=words):
        load_image(f)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_bomb_is_refused_from_the_header_before_decoding():
    data = png_bomb(20000)
    assert len(data) < 200_000  # 400 megapixels in ~50 KB
    t = time.perf_counter()
    with pytest.raises(ImageError, match="megapixels: too large to open safely"):
        load_image(data)
    assert time.perf_counter() - t < 1.0  # decoding 400 MP would take many seconds and ~400 MB


def test_our_pixel_limit_applies_below_pillows(tmp_path):
    img = photo_like((300, 200))
    png = io.BytesIO()
    img.save(png, "PNG")
    with pytest.raises(ImageError, match="megapixels"):
        load_image(png.getvalue(), max_pixels=300 * 200 - 1)
    assert load_image(png.getvalue(), max_pixels=300 * 200).size == (300, 200)
    assert load_image(jpeg_bytes(img), max_pixels=300 * 200).size == (300, 200)
    with pytest.raises(ImageError, match="megapixels"):  # PIL images in memory are checked too
        load_image(img, max_pixels=1000)


def test_byte_limit_missing_file_text_mode_and_wrong_type(tmp_path):
    data = jpeg_bytes(photo_like())
    with pytest.raises(ImageError, match="limit"):
        load_image(data, max_bytes=len(data) - 1)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    with pytest.raises(ImageError, match="limit"):
        load_image(p, max_bytes=len(data) - 1)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")
    with open(p, "r", encoding="latin-1") as f, pytest.raises(ImageError, match="text mode"):
        load_image(f)
    with pytest.raises(ImageError, match="expected a path"):
        load_image(12345)  # type: ignore[arg-type]


def test_unreadable_paths_are_refused_not_raised_as_oserror(tmp_path, monkeypatch):
    """OSError from the file system (no permission, a name too long, an I/O error) becomes ImageError.

    Tests run as root, which reads chmod 000 files, so the permission case is simulated.
    """
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path / "folder.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "dangling.jpg")
    with pytest.raises(ImageError, match="cannot read .*name too long"):
        load_image(tmp_path / ("x" * 300 + ".jpg"))  # stat() itself fails with ENAMETOOLONG
    p = tmp_path / "locked.jpg"
    p.write_bytes(jpeg_bytes(photo_like()))

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(p), "read_bytes", denied)
    with pytest.raises(ImageError, match="cannot read .*locked.jpg: Permission denied"):
        load_image(p)

    class Broken(io.RawIOBase):
        def read(self, n=-1):
            raise OSError(5, "Input/output error")

    with pytest.raises(ImageError, match="cannot read the file: Input/output error"):
        load_image(Broken())


def test_corrupt_png_data_is_refused(tmp_path):
    buf = io.BytesIO()
    photo_like((64, 64)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * 64  # smash the compressed pixel stream (CRC no longer matches)
    with pytest.raises(ImageError):
        load_image(bytes(data))


# -- conversions ---------------------------------------------------------------------------------------
def test_plain_jpeg_from_path_bytes_and_file(tmp_path):
    p = tmp_path / "photo.jpg"
    p.write_bytes(jpeg_bytes(photo_like((320, 240))))
    for src in (p, str(p), p.read_bytes(), io.BytesIO(p.read_bytes())):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (320, 240)


def test_cmyk_becomes_the_right_rgb(tmp_path):
    img = load_image(write_odd_inputs(tmp_path)["cmyk.jpg"])
    assert img.mode == "RGB"
    assert close(px(img, (10, 10)), (200, 30, 30), tol=20)


def test_rgba_is_composited_on_white(tmp_path):
    img = load_image(write_odd_inputs(tmp_path)["rgba.png"])
    assert img.mode == "RGB"
    assert px(img, (10, 10)) == (0, 0, 255)  # opaque blue stays blue
    assert px(img, (50, 10)) == (255, 255, 255)  # transparent black becomes white, not black


def test_half_transparent_and_la_and_palette_transparency():
    half = Image.new("RGBA", (8, 8), (0, 0, 255, 128))
    assert close(px(load_image(half), (1, 1)), (127, 127, 255), tol=2)
    la = Image.new("LA", (8, 8), (0, 0))  # transparent black
    assert px(load_image(la), (1, 1)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    pal.info["transparency"] = 1  # index 1 (black) is transparent
    pal.paste(0, (0, 0, 4, 8))  # left half: index 0, opaque green
    buf = io.BytesIO()
    pal.save(buf, "GIF", transparency=1)
    out = load_image(buf.getvalue())
    assert px(out, (1, 1)) == (0, 255, 0) and px(out, (6, 1)) == (255, 255, 255)
    rgb_key = Image.new("RGB", (8, 8), (10, 20, 30))  # PNG tRNS colour key
    buf = io.BytesIO()
    rgb_key.save(buf, "PNG", transparency=(10, 20, 30))
    assert px(load_image(buf.getvalue()), (1, 1)) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    src = Image.open(write_odd_inputs(tmp_path)["gray16.png"])
    assert src.mode == "I;16"
    img = load_image(tmp_path / "gray16.png")
    row = [px(img, (x, 5))[0] for x in range(64)]
    assert row[0] == 0 and row[-1] == 255
    assert 110 <= row[32] <= 145  # mid-grey stays mid-grey (Pillow's own convert gives 255 here)
    assert row == sorted(row) and len(set(row)) > 50
    assert px(img, (32, 5))[0] == px(img, (32, 5))[1] == px(img, (32, 5))[2]


def test_32_bit_grayscale(tmp_path):
    wide = np.tile(np.linspace(0, 4_000_000, 64), (8, 1)).astype(np.int32)  # beyond 16 bits: stretched
    buf = io.BytesIO()
    Image.fromarray(wide, mode="I").save(buf, "TIFF")
    img = load_image(buf.getvalue())
    assert px(img, (0, 0))[0] == 0 and px(img, (63, 0))[0] == 255 and 100 < px(img, (32, 0))[0] < 155
    i16 = Image.fromarray(np.full((8, 8), 32896, np.int32), mode="I")  # a 16-bit value held in mode I
    assert px(load_image(i16), (0, 0))[0] == 128
    f = Image.fromarray(np.full((8, 8), 0.5, np.float32), mode="F")  # float 0..1
    assert px(load_image(f), (0, 0))[0] == 128
    with pytest.warns(DeprecationWarning):  # Pillow writes mode I as a 16-bit PNG
        Image.fromarray(np.full((8, 8), 40000, np.int32), mode="I").save(tmp_path / "i.png")
    assert px(load_image(tmp_path / "i.png"), (0, 0))[0] == round(40000 / 257)


def test_grayscale_and_1_bit(tmp_path):
    img = load_image(write_odd_inputs(tmp_path)["gray.png"])
    assert img.mode == "RGB"
    r, g, b = px(img, (40, 3))
    assert r == g == b and 150 < r < 170
    one = Image.new("1", (8, 8), 1)
    assert px(load_image(one), (0, 0)) == (255, 255, 255)


def test_animated_gif_gives_the_first_frame(tmp_path):
    img = load_image(write_odd_inputs(tmp_path)["animated.gif"])
    assert img.mode == "RGB" and close(px(img, (5, 5)), (255, 0, 0), tol=5)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    out = load_image(jpeg_bytes(img, exif=exif.tobytes()))
    assert out.size == (20, 40)
    assert close(px(out, (10, 5)), (255, 0, 0), tol=30) and close(px(out, (10, 35)), (0, 0, 255), tol=30)


def test_pil_input_is_not_modified():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = load_image(rgba)
    assert rgba.mode == "RGBA" and px(rgba, (0, 0)) == (0, 0, 0, 0) and out.mode == "RGB"
    rgb = Image.new("RGB", (8, 8), (1, 2, 3))
    out = load_image(rgb)
    assert out is not rgb
    out.putpixel((0, 0), (9, 9, 9))
    assert px(rgb, (0, 0)) == (1, 2, 3)


def test_draft_size_shrinks_big_jpegs_but_keeps_both_sides_large_enough():
    data = jpeg_bytes(photo_like((2000, 1500)))
    full = load_image(data)
    small = load_image(data, draft_size=224)
    assert full.size == (2000, 1500)
    assert small.size[0] < 2000 and min(small.size) >= 224
    assert load_image(data, draft_size=5000).size == (2000, 1500)


def test_real_photos_load_at_their_size(fullres_dir):
    rows = [json.loads(line) for line in (fullres_dir / "metadata.jsonl").read_text().splitlines()[:5]]
    for row in rows:
        path = fullres_dir / row["file_name"]
        img = load_image(path)
        assert img.mode == "RGB" and img.size == Image.open(path).size


def test_bomb_under_pillows_limit_is_refused_from_its_header_before_any_pixel_is_decoded(monkeypatch):
    """A 9000x9000 1-bit PNG is ~9 KiB and 81 MP: above our 50 MP limit, below Pillow's own (~89 MP), so
    only our header check stands between it and a full decode."""
    import io

    from PIL import Image, ImageFile

    from storyteller.images import MAX_PIXELS, ImageError, load_image

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG", optimize=True)
    data = buf.getvalue()
    assert len(data) < 64 * 1024 and MAX_PIXELS < 9000 * 9000 < (Image.MAX_IMAGE_PIXELS or 0)
    decoded = []

    def no_decoding(self, *a, **k):
        decoded.append(self.size)
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match="9000x9000 pixels \\(81 megapixels\\)"):
        load_image(data)
    assert decoded == []


# -- big JPEGs: the pixel limit applies to what is decoded -------------------------------------------------
def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims ``width`` x ``height``: cheap to make, and a
    decoder that believed it would allocate for the claimed size."""
    data = bytearray(jpeg_bytes(photo_like((64, 48))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("max_pixels, want", [(3_000_000, (2000, 1500)), (1_000_000, (1000, 750)),
                                              (200_000, (500, 375)), (47_000, (250, 188))])
def test_a_jpeg_over_the_pixel_limit_is_decoded_shrunk_by_the_least_factor_that_fits(max_pixels, want, monkeypatch):
    from PIL.JpegImagePlugin import JpegImageFile

    data = jpeg_bytes(photo_like((2000, 1500)))
    sizes = []
    real_load = JpegImageFile.load

    def spy(self, *a, **k):  # the size the decoder is asked for, before it decodes a pixel
        sizes.append(self.size)
        return real_load(self, *a, **k)

    monkeypatch.setattr(JpegImageFile, "load", spy)
    img = load_image(data, max_pixels=max_pixels)
    assert img.size == want and sizes[0] == want and want[0] * want[1] <= max_pixels


def test_a_jpeg_that_does_not_fit_even_at_one_eighth_and_other_formats_over_the_limit_are_refused():
    data = jpeg_bytes(photo_like((2000, 1500)))
    with pytest.raises(ImageError, match="2000x1500 pixels .*too large"):
        load_image(data, max_pixels=46_000)  # 1/8 is 250x188 = 47,000 pixels
    with pytest.raises(ImageError, match="2000x1500 pixels"):  # over the JPEG header limit
        load_image(data, max_jpeg_pixels=2_000_000)
    png = io.BytesIO()
    photo_like((2000, 1500)).save(png, "PNG")
    with pytest.raises(ImageError, match="megapixels"):  # no shrinking decode for other formats
        load_image(png.getvalue(), max_pixels=1_000_000)


def test_jpegs_above_the_librarys_own_bomb_limit_are_decoded_shrunk(monkeypatch):
    """The library's global limit (here lowered to 1 MP, so 2 MP is 'twice over') refuses before any
    shrinking; our loader reads JPEG headers itself, so a JPEG that fits once shrunk is captioned, while a
    PNG of the same size is still refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    img = photo_like((2000, 1500))
    assert load_image(jpeg_bytes(img), max_pixels=1_000_000).size == (1000, 750)
    png = io.BytesIO()
    img.save(png, "PNG")
    with pytest.raises(ImageError, match="too large"):
        load_image(png.getvalue(), max_pixels=1_000_000)


def test_a_200_mp_header_is_decoded_shrunk_and_a_400_mp_one_is_refused():
    """The header claims 16320x12240 (a 200 MP phone photo); the decoder fills what the data lacks."""
    assert load_image(jpeg_with_header_size(16320, 12240), draft_size=256).size == (2040, 1530)  # 1/8
    assert load_image(jpeg_with_header_size(16320, 12240)).size == (8160, 6120)  # the least shrink under 50 MP
    with pytest.raises(ImageError, match="20000x20000 pixels \\(400 megapixels\\): too large"):
        load_image(jpeg_with_header_size(20000, 20000), draft_size=256)


def test_messages_name_no_library():
    for data in (b"not an image at all" * 10, jpeg_bytes(photo_like())[:300], png_bomb(20000)):
        with pytest.raises(ImageError) as e:
            load_image(data)
        assert "pillow" not in str(e.value).lower() and "PIL" not in str(e.value) and "bomb" not in str(e.value)


def test_a_progressive_jpeg_is_refused_when_its_coefficients_would_not_fit(monkeypatch):
    """A progressive JPEG's decoder holds every DCT coefficient (2 bytes a sample) whatever the scale: its
    size is bounded by that buffer. 2000x1500 at 4:2:0 holds 2000*1500*1.5*2 = 9 MB of them; a baseline JPEG
    of the same size needs no such buffer."""
    import storyteller.images as images

    img = photo_like((2000, 1500))
    progressive, baseline = jpeg_bytes(img, progressive=True), jpeg_bytes(img)
    monkeypatch.setattr(images, "MAX_PROGRESSIVE_BUFFER", 9_100_000)
    assert load_image(progressive, draft_size=256).size == (500, 375)
    monkeypatch.setattr(images, "MAX_PROGRESSIVE_BUFFER", 8_900_000)
    with pytest.raises(ImageError, match="2000x1500 progressive JPEG .*too large"):
        load_image(progressive, draft_size=256)
    assert load_image(baseline, draft_size=256).size == (500, 375)
