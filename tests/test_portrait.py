"""LiveAvatar's portrait size rule and crop, checked against hand-derived numbers."""
import numpy as np
import pytest
import torch
from PIL import Image

from liveavatar.portrait import parse_area, prepare_portrait, target_size


@pytest.mark.parametrize("hw, size, expected", [
    # 768x512 at 384*256: sqrt(98304 / 393216) = 0.5 -> 384x256, already multiples of 64.
    ((768, 512), "384*256", (384, 256)),
    # 512x512 fits 704*384 = 270336 unscaled: scale 1.0 -> 512x512.
    ((512, 512), "704*384", (512, 512)),
    # 1000x700 at 270336: the first scale of the sweep with padded area <= budget is
    # 0.62144 - 18 * 0.0025508 = 0.5755 -> 575x402 -> padded 576x448 (258048).
    ((1000, 700), "704*384", (576, 448)),
    # 640x600 at 98304: i = 33 -> scale 0.42586 -> 272x255 -> padded 320x256.
    ((640, 600), "384*256", (320, 256)),
    # very wide 100x1000: i = 40 -> scale 0.76398 -> 76x763 -> padded 128x768 (= 98304).
    ((100, 1000), "384*256", (128, 768)),
    # square 1024x1024 at 270336: max_scale 0.50775, min_scale 0.30014, step 0.0020761;
    # i = 4 is the first with int(1024 s) <= 512: s = 0.49945 -> 511x511 -> padded 512x512.
    ((1024, 1024), "704*384", (512, 512)),
    # 1080p portrait 1920x1080 at 270336: max_scale 0.361068, min_scale 0.211925, step 0.00149143;
    # i = 4: s = 0.355103 -> 681x383 -> padded 704x384 (i = 3: 684x385 -> 704x448, too big).
    ((1920, 1080), "704*384", (704, 384)),
])
def test_target_size_follows_liveavatar_rule(hw, size, expected):
    assert target_size(*hw, size) == expected == target_size(*hw, parse_area(size))


def test_sizes_are_multiples_of_64_within_budget():
    for h in range(200, 2000, 137):
        for w in range(200, 2000, 211):
            for area in (384 * 256, 704 * 384, 720 * 400):
                th, tw = target_size(h, w, area)
                assert th % 64 == 0 and tw % 64 == 0 and th * tw <= area


def test_uniform_image_maps_to_its_value_in_minus_one_one():
    gray = Image.fromarray(np.full((768, 512, 3), 128, np.uint8))
    pixels = prepare_portrait(gray, "384*256")
    assert pixels.shape == (3, 1, 384, 256)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 128 / 255 * 2 - 1))


def test_padding_where_resized_image_is_shorter_than_target():
    """640x600 -> 320x256: the shorter side goes to 256, height int(256*640/600) = 273, so
    47 rows are zero-padded: 23 on top, 24 at the bottom (black, -1)."""
    white = torch.ones(1, 640, 600, 3)  # ComfyUI IMAGE layout
    pixels = prepare_portrait(white, "384*256")
    assert pixels.shape == (3, 1, 320, 256)
    assert (pixels[:, 0, :23] == -1).all() and (pixels[:, 0, -24:] == -1).all()
    assert (pixels[:, 0, 23:-24] == 1).all()


@pytest.mark.parametrize("bad", ["704x", "big", "704*abc", "8*8"])
def test_bad_size_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="704\\*384"):
        parse_area(bad)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((300, 200, 3), np.float32), "uint8"),
    (torch.zeros(1, 3, 300, 200), "IMAGE"),
    (torch.zeros(0, 300, 200, 3), "IMAGE"),
    ("/nonexistent/portrait.png", "cannot read"),
])
def test_bad_image_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        prepare_portrait(bad, "384*256")


def test_image_layouts_agree():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    from_array = prepare_portrait(array, "384*256")
    from_pil = prepare_portrait(Image.fromarray(array), "384*256")
    batch = torch.stack([torch.from_numpy(array).float() / 255, torch.zeros(300, 200, 3)])  # ComfyUI IMAGE
    from_tensor = prepare_portrait(batch, "384*256")  # the first image of the batch
    assert torch.equal(from_array, from_pil) and torch.equal(from_array, from_tensor)
    assert from_array.shape == (3, 1, *target_size(300, 200, "384*256"))
    assert from_array.min() >= -1 and from_array.max() <= 1


def test_small_image_is_scaled_up_to_one_tile():
    # 40x40 fits 384*256 unscaled: scale 1.0 -> 40x40 -> padded 64x64; resized 40 -> 64.
    pixels = prepare_portrait(np.full((40, 40, 3), 255, np.uint8), "384*256")
    assert pixels.shape == (3, 1, 64, 64) and (pixels == 1).all()


def test_grey_image_becomes_rgb():
    grey = np.full((256, 256), 255, np.uint8)
    pixels = prepare_portrait(grey, "256*256")
    assert pixels.shape == (3, 1, 256, 256) and (pixels == 1).all()
