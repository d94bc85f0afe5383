"""One image conversion (csg.images) behind every path: the edits' loader, the inversion, the VLM and LPIPS.

Each case is a picture in one PIL mode with the RGB it must become, worked out here in numpy from the
documented policy (transparency composited onto white, grey repeated, 16 bits scaled to 8).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from csg.abduction import invert
from csg.counterfactual import load_image
from csg.errors import InputError
from csg.images import eight_bit, image_to_tensor, rgb_channels, to_rgb
from csg.metrics import LPIPS, lpips_distance, lpips_heads, vgg16_features
from csg.vlm import image_for_vlm
from tests.sdxl_fixtures import sample_image

SIZE = 32


def over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.round(color * (alpha / 255.0) + 255.0 * (1 - alpha / 255.0)).astype(np.uint8)


def rgba_case():
    rgb = np.asarray(sample_image(SIZE, SIZE, seed=5)).astype(np.float64)
    alpha = np.tile(np.linspace(0, 255, SIZE).round(), (SIZE, 1))[..., None]  # clear on the left, opaque on the right
    picture = Image.fromarray(np.concatenate([rgb, alpha], axis=-1).astype(np.uint8), "RGBA")
    return picture, over_white(rgb, alpha)


def la_case():
    grey = np.tile(np.linspace(0, 255, SIZE).round(), (SIZE, 1)).T[..., None]
    alpha = np.tile(np.linspace(255, 0, SIZE).round(), (SIZE, 1))[..., None]
    picture = Image.fromarray(np.concatenate([grey, alpha], axis=-1).astype(np.uint8), "LA")
    return picture, np.repeat(over_white(grey, alpha), 3, axis=-1)


def grey_case():
    grey = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 256).astype(np.uint8)
    return Image.fromarray(grey, "L"), np.repeat(grey[..., None], 3, axis=-1)


def palette_case():
    colors = np.array([[0, 0, 0], [200, 30, 40], [10, 180, 90], [20, 40, 250]], dtype=np.uint8)
    index = (np.arange(SIZE)[:, None] + np.arange(SIZE)[None]) % 4
    picture = Image.fromarray(index.astype(np.uint8), "P")
    picture.putpalette(colors.ravel().tolist())
    picture.info["transparency"] = 0  # entry 0 is fully transparent
    expected = colors[index]
    expected[index == 0] = 255
    return picture, expected


def sixteen_bit_case():
    ramp = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
    picture = Image.fromarray(ramp)  # mode I;16
    return picture, np.repeat(np.round(ramp / 65535 * 255).astype(np.uint8)[..., None], 3, axis=-1)


CASES = {"RGBA": rgba_case, "LA": la_case, "L": grey_case, "P with transparency": palette_case,
         "I;16": sixteen_bit_case}


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]()


def assert_pixels(picture: Image.Image, expected: np.ndarray):
    assert picture.mode == "RGB" and picture.size == (SIZE, SIZE)
    np.testing.assert_allclose(np.asarray(picture).astype(int), expected.astype(int), atol=1)


def test_to_rgb_follows_the_policy(case):
    picture, expected = case
    assert_pixels(to_rgb(picture), expected)


def test_the_loader_of_the_edits_converts_alike_from_memory_and_from_a_file(case, tmp_path):
    picture, expected = case
    assert_pixels(load_image(picture), expected)
    picture.save(tmp_path / "picture.png")
    assert_pixels(load_image(tmp_path / "picture.png"), expected)


def test_the_vlm_sees_the_same_picture(case):
    picture, expected = case
    assert_pixels(image_for_vlm(picture), expected)


def test_the_inversion_tensor_is_the_same_picture(case):
    picture, expected = case
    pixels = image_to_tensor(picture)
    assert pixels.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(pixels, torch.from_numpy(np.asarray(to_rgb(picture)) / 255.0).float().permute(2, 0, 1)[None])


def test_lpips_reads_the_same_picture(case):
    picture, expected = case
    torch.manual_seed(0)
    model = LPIPS(vgg16_features(), lpips_heads())
    assert float(lpips_distance(model, picture, Image.fromarray(expected))[0]) < 1e-3
    assert float(lpips_distance(model, picture, to_rgb(picture))[0]) == 0.0


def test_tensors_follow_the_same_policy():
    picture, expected = rgba_case()
    rgba = torch.from_numpy(np.asarray(picture) / 255.0).float()  # (H, W, 4), as a ComfyUI IMAGE holds it
    as_rgb = torch.from_numpy(expected / 255.0).float()
    assert torch.allclose(rgb_channels(rgba, dim=-1), as_rgb, atol=1 / 255)
    assert torch.allclose(image_to_tensor(rgba.permute(2, 0, 1))[0], as_rgb.permute(2, 0, 1), atol=1 / 255)
    grey_alpha = torch.stack([torch.full((4, 4), 0.2), torch.full((4, 4), 0.5)])
    assert torch.allclose(rgb_channels(grey_alpha), torch.full((3, 4, 4), 0.6))  # 0.2 * 0.5 + 1 * 0.5
    grey = torch.rand(1, 4, 4)
    assert torch.equal(rgb_channels(grey), grey.expand(3, 4, 4))
    with pytest.raises(InputError, match="1 \\(grey\\), 2 \\(grey and alpha\\)"):
        rgb_channels(torch.zeros(5, 4, 4))


def test_the_inversion_of_a_transparent_picture_is_that_of_the_picture_on_white(tiny_host):
    picture, expected = rgba_case()
    picture = picture.resize((64, 64))
    flat = to_rgb(picture)
    assert torch.equal(invert(tiny_host, picture, num_steps=4).x0, invert(tiny_host, flat, num_steps=4).x0)


def test_what_is_not_a_picture_is_named():
    with pytest.raises(InputError, match="Expected a PIL image"):
        to_rgb(np.zeros((4, 4, 3)))
    assert eight_bit(Image.new("RGB", (2, 2))).mode == "RGB"  # 8-bit modes pass unchanged
