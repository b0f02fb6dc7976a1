"""Images as people see them (get.images): EDM's quantisation in grids and PNG files, pair pictures."""

import numpy as np
import pytest
import torch
from PIL import Image

from get.images import pair_grid, save_image_grid, save_png


def test_image_grid(tmp_path):
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 4, 2)  # image i has the value -1 + i/2
    save_image_grid(images, tmp_path / "g.png", nrow=3)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (8, 6, 3)
    assert grid[0, 0].tolist() == [0, 0, 0] and grid[0, 2, 0] == 64 and grid[4, 2, 0] == 255  # x·127.5 + 128
    assert grid[4, 4, 0] == 0  # the unused cell stays black
    with pytest.raises(ValueError, match="1 or 3 channels"):
        save_image_grid(torch.zeros(1, 2, 4, 4), tmp_path / "bad.png")


def test_png_and_pair_grid(tmp_path):
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    save_png(image, tmp_path / "a" / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "x.png")), image)
    noise, img = torch.full((2, 1, 2, 2), 3.0), torch.full((2, 1, 2, 2), -1.0)
    tiles = pair_grid(noise, img)  # noise / 3, image, noise / 3, image
    assert tiles.shape == (4, 1, 2, 2) and tiles[:, 0, 0, 0].tolist() == [1.0, -1.0, 1.0, -1.0]
