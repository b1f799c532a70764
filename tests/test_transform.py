"""safeclip.image_transform against torchvision's arithmetic, hand-computed values and transformers."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import safeclip

# ---------------------------------------------------------------------------------------------
# The oracle: OpenAI's Compose([Resize(R, BICUBIC), CenterCrop(R), to RGB, ToTensor(), Normalize])
# followed step by step through torchvision's code for PIL images (torchvision is not installed).
# ---------------------------------------------------------------------------------------------


def torchvision_resize(img, size):
    # transforms.functional.resize -> _compute_resized_output_size -> F_pil.resize
    image_width, image_height = img.size
    w, h = image_width, image_height
    short, long = (w, h) if w <= h else (h, w)
    requested_new_short = size
    new_short, new_long = requested_new_short, int(requested_new_short * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if [image_height, image_width] == [new_h, new_w]:
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def torchvision_pad(img, padding_ltrb):
    # F_pil.pad(img, padding, fill=0, padding_mode="constant")
    fill = 0 if len(img.getbands()) == 1 else (0,) * len(img.getbands())
    if img.mode == "P":
        palette = img.getpalette()
        image = ImageOps.expand(img, border=tuple(padding_ltrb), fill=fill)
        image.putpalette(palette)
        return image
    return ImageOps.expand(img, border=tuple(padding_ltrb), fill=fill)


def torchvision_center_crop(img, size):
    # transforms.functional.center_crop
    image_width, image_height = img.size
    crop_height, crop_width = size, size
    if crop_width > image_width or crop_height > image_height:
        padding_ltrb = [
            (crop_width - image_width) // 2 if crop_width > image_width else 0,
            (crop_height - image_height) // 2 if crop_height > image_height else 0,
            (crop_width - image_width + 1) // 2 if crop_width > image_width else 0,
            (crop_height - image_height + 1) // 2 if crop_height > image_height else 0,
        ]
        img = torchvision_pad(img, padding_ltrb)
        image_width, image_height = img.size
        if crop_width == image_width and crop_height == image_height:
            return img
    crop_top = int(round((image_height - crop_height) / 2.0))
    crop_left = int(round((image_width - crop_width) / 2.0))
    return img.crop((crop_left, crop_top, crop_left + crop_width, crop_top + crop_height))  # F_pil.crop


def torchvision_to_tensor(pic):
    # transforms.functional.to_tensor for an RGB PIL image
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
    img = img.permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.float32).div(255)


def torchvision_normalize(tensor, mean, std):
    mean = torch.as_tensor(mean, dtype=tensor.dtype)
    std = torch.as_tensor(std, dtype=tensor.dtype)
    return tensor.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def openai_preprocess(img, size):
    img = torchvision_center_crop(torchvision_resize(img, size), size)
    return torchvision_normalize(torchvision_to_tensor(img.convert("RGB")),
                                 (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


# ---------------------------------------------------------------------------------------------
# Test images
# ---------------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "P+transparency", "P+alpha bytes", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr",
         "LAB", "HSV", "I", "I;16", "F"]


def make_image(mode, width, height, seed=0):
    rng = np.random.default_rng([seed, width, height])
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 70_000, (height, width), dtype=np.int32))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65_536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.uniform(-50, 400, (height, width)).astype(np.float32))
    if mode == "1":
        return Image.frombytes("L", (width, height), rng.bytes(width * height)).convert("1")
    base = mode.split("+")[0]
    image = Image.frombytes(base, (width, height), rng.bytes(width * height * len(Image.new(base, (1, 1)).getbands())))
    if base in ("P", "PA"):
        image.putpalette(rng.bytes(768))
    if mode == "P+transparency":
        image.info["transparency"] = 7
    if mode == "P+alpha bytes":
        image.info["transparency"] = rng.bytes(256)
    return image


SIZES = [(1, 1), (1, 500), (500, 1), (2, 3), (3, 2), (7, 5), (31, 17), (32, 32), (33, 32), (32, 35), (39, 32),
         (64, 48), (333, 501)]


@pytest.fixture(autouse=True)
def quiet_palette_warning():
    with warnings.catch_warnings():  # PIL suggests RGBA for "P+alpha bytes"; torchvision gets it too
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        yield


# ---------------------------------------------------------------------------------------------
# Same pixels as OpenAI's torchvision transform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_matches_torchvision_for_many_sizes(mode):
    preprocess = safeclip.image_transform(32)
    for width, height in SIZES:
        image = make_image(mode, width, height)
        actual = preprocess(image)
        assert actual.shape == (3, 32, 32) and actual.dtype == torch.float32
        assert (actual - openai_preprocess(image, 32)).abs().max() <= 1e-6, (mode, width, height)


@pytest.mark.parametrize("size", [(3000, 2000), (2000, 3000), (1, 500), (640, 480), (225, 300)])
def test_matches_torchvision_at_224_including_huge_images(size):
    image = make_image("RGB", *size)
    assert (safeclip.image_transform(224)(image) - openai_preprocess(image, 224)).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "F", "I;16", "CMYK", "1"])
def test_center_crop_pads_small_images_like_torchvision(mode):
    for width, height in [(1, 1), (3, 2), (31, 40), (40, 31), (20, 20), (31, 32)]:
        image = make_image(mode, width, height)
        actual, expected = safeclip._center_crop(image, 32), torchvision_center_crop(image, 32)
        assert actual.size == (32, 32) and actual.mode == expected.mode
        assert np.array_equal(np.array(actual), np.array(expected)), (mode, width, height)
        if mode == "P":
            assert actual.getpalette() == expected.getpalette()


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, resolution, expected", [
    ((3000, 2000), 224, (336, 224)),
    ((2000, 3000), 224, (224, 336)),
    ((333, 501), 224, (224, 337)),   # 224 * 501 / 333 = 337.01
    ((225, 300), 224, (224, 298)),   # 298.67 is truncated, not rounded
    ((7, 3), 224, (522, 224)),       # 522.67
    ((1, 500), 32, (32, 16000)),
    ((500, 1), 32, (16000, 32)),
    ((1, 1), 32, (32, 32)),
])
def test_resize_makes_the_short_side_r_and_truncates_the_long_side(size, resolution, expected):
    assert safeclip._resize_short_side(Image.new("RGB", size), resolution).size == expected


def test_resize_leaves_an_image_of_the_right_size_alone():
    image = Image.new("RGB", (224, 300))
    assert safeclip._resize_short_side(image, 224) is image


@pytest.mark.parametrize("extra, offset", [(1, 0), (2, 1), (3, 2), (5, 2), (7, 4), (9, 4), (11, 6)])
def test_crop_offset_rounds_halves_to_even(extra, offset):
    # Column x holds the value x, so the first cropped column tells the left offset.
    columns = np.tile(np.arange(32 + extra, dtype=np.uint8), (32, 1))
    cropped = np.array(safeclip._center_crop(Image.fromarray(columns), 32))
    assert cropped[0, 0] == offset  # round((extra) / 2): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4


def test_solid_colour_becomes_the_normalised_constant():
    pixels = safeclip.image_transform(48)(Image.new("RGB", (50, 80), (255, 0, 128)))
    expected = [(255 / 255 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258,
                (128 / 255 - 0.40821073) / 0.27577711]
    for channel, value in enumerate(expected):
        assert torch.allclose(pixels[channel], torch.tensor(value), atol=1e-6, rtol=0)


def test_grayscale_gives_three_equal_channels_before_normalising():
    pixels = safeclip.image_transform(32)(make_image("L", 40, 50))
    mean, std = torch.tensor(safeclip.CLIP_MEAN).view(3, 1, 1), torch.tensor(safeclip.CLIP_STD).view(3, 1, 1)
    raw = pixels * std + mean
    assert torch.allclose(raw[0], raw[1], atol=1e-6) and torch.allclose(raw[1], raw[2], atol=1e-6)


@pytest.mark.parametrize("resolution", [0, -3, 22.5, "224"])
def test_bad_resolution_is_rejected(resolution):
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        safeclip.image_transform(resolution)


def test_non_image_input_is_rejected():
    with pytest.raises(TypeError, match="expected a PIL.Image.Image, got ndarray"):
        safeclip.image_transform(32)(np.zeros((32, 32, 3), dtype=np.uint8))


def test_transform_pickles_for_dataloader_workers():
    preprocess = pickle.loads(pickle.dumps(safeclip.image_transform(32)))
    image = make_image("RGB", 40, 50)
    assert torch.equal(preprocess(image), safeclip.image_transform(32)(image))


# ---------------------------------------------------------------------------------------------
# transformers' CLIPImageProcessor (its PIL backend; the default one needs torchvision)
# ---------------------------------------------------------------------------------------------


def hugging_face_preprocess(image, resolution):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": resolution},
                                      crop_size={"height": resolution, "width": resolution})
    return torch.from_numpy(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBX"])
def test_matches_transformers_when_its_crop_offset_agrees(mode):
    # (resized side - R) % 4 != 3 for all these sizes; see the next test for the other case.
    for width, height in [(64, 48), (48, 64), (333, 501), (35, 35), (1, 50), (640, 480)]:
        image = make_image(mode, width, height)
        assert (safeclip.image_transform(32)(image) - hugging_face_preprocess(image, 32)).abs().max() <= 1e-6


def test_transformers_crop_is_one_pixel_off_when_torchvision_rounds_up():
    # Width 39 -> crop offset round(3.5) = 4 in torchvision, 7 // 2 = 3 in transformers.
    image = make_image("RGB", 39, 32)
    ours, theirs = safeclip.image_transform(32)(image), hugging_face_preprocess(image, 32)
    assert (ours - theirs).abs().max() > 0.1
    assert (ours[:, :, :-1] - theirs[:, :, 1:]).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "CMYK", "I;16", "F"])
def test_transformers_differs_where_it_converts_to_rgb_before_resizing(mode):
    # transformers converts to RGB first (compositing alpha onto white); torchvision resizes the
    # image in its own mode (premultiplied alpha, nearest neighbour for "P" and "1", no clipping
    # of 16-bit and float values) and drops alpha after. Same image sizes as the test above.
    image = make_image(mode, 64, 48)
    assert (safeclip.image_transform(32)(image) - hugging_face_preprocess(image, 32)).abs().max() > 0.1
    # That order is the whole difference: given transformers' own RGB conversion first, we agree.
    from transformers.image_transforms import convert_to_rgb
    rgb = Image.fromarray(convert_to_rgb(image, return_numpy=True))
    assert (safeclip.image_transform(32)(rgb) - hugging_face_preprocess(image, 32)).abs().max() <= 1e-6
