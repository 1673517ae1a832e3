"""Batch augmentation and the learning-rate schedule: pure functions on tiny tensors."""
import math

import pytest
import torch

from models.augment import augment, random_crop, random_flip
from models.recipe import Recipe
from models.train import alternate_flips, lr_at


def test_crop_without_padding_is_identity():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)


def test_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], out[i])]
        assert hits, f"image {i} is not a window of its padded original"
        offsets.add(hits[0])
    assert len(offsets) > 5, "crops should use many different offsets"


def test_reflect_crop_is_a_window_of_the_mirrored_edges_and_draws_the_same_offsets():
    x = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop(x, 2, torch.Generator().manual_seed(1), reflect=True)
    zeros = random_crop(x, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    assert torch.equal(padded[0, 0, 0, 2:10], x[0, 0, 2])          # the row above the image mirrors row 1
    moved = 0
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], out[i])]
        assert hits, f"image {i} is not a window of its reflect-padded original"
        assert torch.equal(zeros[i], torch.nn.functional.pad(x[i], (2, 2, 2, 2))[:, hits[0][0]:hits[0][0] + 8,
                                                                                      hits[0][1]:hits[0][1] + 8])
        moved += hits[0] != (2, 2)
    assert moved > 40 and int((out == 0).sum()) == 0      # shifted windows, and no zero border (x has none)


def test_alternating_flips_mirror_each_image_every_other_epoch_from_its_first_coin():
    x = torch.randint(0, 255, (6, 3, 4, 4), dtype=torch.uint8)
    first = torch.tensor([True, False, True, True, False, False])
    for epoch in (1, 2, 3, 4):
        out = alternate_flips(x, first, epoch)
        mirrored = first if epoch % 2 == 1 else ~first
        for i in range(len(x)):
            assert torch.equal(out[i], x[i].flip(2) if mirrored[i] else x[i]), (epoch, i)


def test_flip_mirrors_about_half_the_images():
    x = torch.randint(0, 255, (400, 3, 4, 4), dtype=torch.uint8)
    out = random_flip(x, torch.Generator().manual_seed(2))
    same = [torch.equal(out[i], x[i]) for i in range(len(x))]
    mirrored = [torch.equal(out[i], x[i].flip(2)) for i in range(len(x))]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 150 < sum(mirrored) < 250


def test_augment_is_deterministic_for_a_seed_and_returns_float():
    x = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, 4, True, torch.Generator().manual_seed(3))
    b = augment(x, 4, True, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 255


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedule_warms_up_linearly(schedule):
    r = Recipe(lr=0.4, warmup=0.25, schedule=schedule)
    assert lr_at(0.0, r) == 0.0
    assert lr_at(0.125, r) == pytest.approx(0.2)
    assert lr_at(0.25, r) == pytest.approx(0.4)


def test_schedule_starts_and_ends_at_fractions_of_the_peak():
    """airbench's shape: 0.2 x the peak -> the peak at 23% of the run -> 0.07 x the peak at the end."""
    r = Recipe(lr=1.5, warmup=0.23, lr_start=0.2, lr_end=0.07)
    assert lr_at(0.0, r) == pytest.approx(0.3)
    assert lr_at(0.115, r) == pytest.approx(1.5 * 0.6)
    assert lr_at(0.23, r) == pytest.approx(1.5)
    assert lr_at(0.23 + 0.77 / 2, r) == pytest.approx(1.5 * (1 + 0.07) / 2)
    assert lr_at(1.0, r) == pytest.approx(1.5 * 0.07)
    cos = Recipe(lr=1.0, warmup=0.0, schedule="cosine", lr_end=0.1)
    assert lr_at(0.5, cos) == pytest.approx(0.55) and lr_at(1.0, cos) == pytest.approx(0.1)


def test_schedule_shapes_after_warmup():
    one, cos, const = (Recipe(lr=1.0, warmup=0.0, schedule=s) for s in ("onecycle", "cosine", "constant"))
    assert lr_at(0.5, one) == pytest.approx(0.5) and lr_at(1.0, one) == pytest.approx(0.0)
    assert lr_at(0.5, cos) == pytest.approx(0.5) and lr_at(0.25, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(1.0, cos) == pytest.approx(0.0)
    assert lr_at(0.7, const) == 1.0


def test_recipe_rejects_bad_fields_by_name():
    with pytest.raises(ValueError, match="'lr'"):
        Recipe(lr=-1)
    with pytest.raises(ValueError, match="'loss'.*ce, focal"):
        Recipe(loss="mse")
    with pytest.raises(ValueError, match="'lr_end'.*fraction"):
        Recipe(lr_end=1.5)
    with pytest.raises(ValueError, match="unknown field.*bogus"):
        Recipe.from_dict({"bogus": 1})


def test_a_unit_crops_with_reflection_when_its_hyperparameters_say_so():
    """``run_local`` (what a Python worker's unit runs) pads its crops as the unit's ``crop_reflect`` says:
    the same seed gives another delta with reflection than with zeros, and the same one without crops."""
    import numpy as np

    from models import registry
    from models.local import run_local, state_arrays

    torch.manual_seed(0)
    base = state_arrays(registry.build("cnn"))
    x = np.random.default_rng(1).integers(0, 256, (32, 3, 32, 32)).astype(np.uint8)
    y = np.arange(32) % 10

    def delta(pad: int, reflect: bool) -> dict:
        recipe = Recipe(batch_size=16, crop_pad=pad, flip=False, crop_reflect=reflect)
        return run_local("cnn", base, x, y, recipe, steps=2, lr=0.05, seed=3).delta

    def same(a: dict, b: dict) -> bool:
        return all(np.array_equal(a[k], b[k]) for k in a)

    assert not same(delta(4, True), delta(4, False))
    assert same(delta(0, True), delta(0, False))
    assert same(delta(4, True), delta(4, True))


def test_image_coins_are_the_images_own_fair_and_fixed():
    """``models.flips.image_coins``: the same image gets the same coin wherever it is in a batch, about half
    the images get each side, one changed pixel draws the coin again, and a parity flips every coin."""
    import numpy as np

    from models.flips import image_coins, mirrors

    x = np.random.default_rng(5).integers(0, 256, (4000, 3, 32, 32)).astype(np.uint8)
    coins = image_coins(x)
    assert coins.dtype == bool and 0.46 < coins.mean() < 0.54
    order = np.random.default_rng(6).permutation(4000)
    assert np.array_equal(image_coins(x[order]), coins[order])
    nudged = x.copy()
    nudged[:, 2, 31, 31] ^= 1
    assert 0.44 < (image_coins(nudged) != coins).mean() < 0.56
    assert np.array_equal(mirrors(x, 0), coins) and np.array_equal(mirrors(x, 1), ~coins)
    with pytest.raises(ValueError, match="uint8 images of 3072 bytes"):
        image_coins(x.astype(np.int16))


def test_a_unit_with_a_flip_parity_mirrors_each_image_by_its_coin_instead_of_drawing():
    """``run_local`` with ``flip_parity`` (a unit of a recipe whose flips alternate) trains on the images its
    coins xor the parity mirror, with no flip drawn: the same delta as the plain run on those images mirrored
    beforehand, and another delta at the other parity."""
    import numpy as np

    from models import registry
    from models.flips import mirrors
    from models.local import run_local, state_arrays

    torch.manual_seed(0)
    base = state_arrays(registry.build("cnn"))
    x = np.random.default_rng(2).integers(0, 256, (32, 3, 32, 32)).astype(np.uint8)
    y = np.arange(32) % 10

    def delta(images, flip: bool, parity=None) -> dict:
        recipe = Recipe(batch_size=16, crop_pad=2, flip=flip)
        return run_local("cnn", base, images, y, recipe, steps=2, lr=0.05, seed=3, flip_parity=parity).delta

    def same(a: dict, b: dict) -> bool:
        return all(np.array_equal(a[k], b[k]) for k in a)

    for parity in (0, 1):
        m = mirrors(x, parity)
        assert 0 < m.sum() < len(m)
        flipped = np.where(m[:, None, None, None], x[..., ::-1], x)
        assert same(delta(x, True, parity), delta(flipped, False))
    assert not same(delta(x, True, 0), delta(x, True, 1))
    assert same(delta(x, False, 1), delta(x, False))   # no flips asked: the parity changes nothing
