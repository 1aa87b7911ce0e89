"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes; shipped with
scikit-learn, no download) as an image folder for --data-set FOLDER:

    OUT/train/<digit>/<n>.png and OUT/val/<digit>/<n>.png   (stratified split, fixed seed)

Images are upscaled (nearest neighbour) to --size pixels and stored as RGB PNGs.
"""
import argparse
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write_digits(out, size=32, val_fraction=0.2, seed=0):
    """Returns (number of train images, number of val images)."""
    if size < 8 or size % 8:
        raise ValueError(f'size must be a positive multiple of 8 (the scans are 8x8), got {size}')
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    scale = size // 8
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=val_fraction,
                                          stratify=digits.target, random_state=seed)
    for split, indices in (('train', idx_train), ('val', idx_val)):
        for i in indices:
            folder = os.path.join(out, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i]).convert('RGB').save(os.path.join(folder, f'{i:04d}.png'))
    return len(idx_train), len(idx_val)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='./datasets/digits', help='output folder')
    parser.add_argument('--size', type=int, default=32, help='image side in pixels (multiple of 8)')
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    a = parser.parse_args()
    n_train, n_val = write_digits(a.out, a.size, a.val_fraction, a.seed)
    print(f'wrote {n_train} train and {n_val} val images (10 classes, {a.size}x{a.size}) to {a.out}')
