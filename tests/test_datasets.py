"""CIFAR pickles, image folders, data errors and DeiT transforms."""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

import datasets
from pipeline_helpers import write_cifar100


def make_args(**kw):
    base = dict(data_set='CIFAR', data_path='', input_size=32, eval_crop_ratio=0.875, color_jitter=0.3,
                aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.25, remode='pixel', recount=1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cifar100_pixels_labels_and_classes(tmp_path):
    train, test = write_cifar100(tmp_path / 'cifar-100-python', n_train=6, n_test=4)
    ds = datasets.CIFARPickles(str(tmp_path / 'cifar-100-python'), 'CIFAR', train=True)
    assert len(ds) == 6 and len(ds.classes) == 100 and ds.classes[7] == 'class7'
    img, label = ds[3]
    assert label == train['fine_labels'][3]
    # row layout: 1024 red values (row-major 32x32), then 1024 green, then 1024 blue
    pix = np.asarray(img)
    row = train['data'][3]
    assert pix[5, 9, 0] == row[5 * 32 + 9] and pix[5, 9, 1] == row[1024 + 5 * 32 + 9]
    assert pix[31, 0, 2] == row[2048 + 31 * 32]
    ds_test = datasets.CIFARPickles(str(tmp_path / 'cifar-100-python'), 'CIFAR', train=False)
    assert ds_test.targets == test['fine_labels']


def test_cifar100_bytes_keys_are_accepted(tmp_path):
    folder = tmp_path / 'c'
    write_cifar100(folder, n_train=2, n_test=2)
    for name in ('train', 'test', 'meta'):  # re-save with bytes keys, as a Python 3 re-pickle would have
        entry = pickle.load(open(folder / name, 'rb'), encoding='latin1')
        pickle.dump({k.encode(): v for k, v in entry.items()}, open(folder / name, 'wb'))
    ds = datasets.CIFARPickles(str(folder), 'CIFAR', train=False)
    assert len(ds) == 2 and ds.classes[0] == 'class0'


def test_data_path_may_name_the_folder_or_its_parent(tmp_path):
    write_cifar100(tmp_path / 'cifar-100-python', n_train=2, n_test=2)
    expected = str(tmp_path / 'cifar-100-python')
    assert datasets.resolve_cifar_folder(str(tmp_path), 'CIFAR', download=False) == expected
    assert datasets.resolve_cifar_folder(expected, 'CIFAR', download=False) == expected


def test_missing_cifar_names_the_paths_and_layout(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(datasets.DataSetError) as err:
        datasets.resolve_cifar_folder(str(missing), 'CIFAR', download=False)
    msg = str(err.value)
    assert str(missing) in msg and os.path.join(str(missing), 'cifar-100-python') in msg
    assert 'train, test, meta' in msg
    with pytest.raises(datasets.DataSetError, match='data_batch_1'):
        datasets.resolve_cifar_folder(str(missing), 'CIFAR10', download=False)


def test_cifar10_batches(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        pickle.dump({'data': rng.integers(0, 256, (3, 3072), dtype=np.uint8), 'labels': [1, 2, 9]},
                    open(folder / name, 'wb'))
    pickle.dump({'label_names': [f'n{i}' for i in range(10)]}, open(folder / 'batches.meta', 'wb'))
    args = make_args(data_set='CIFAR10', data_path=str(tmp_path))
    train, nb_classes = datasets.build_dataset(True, args)
    test, _ = datasets.build_dataset(False, args)
    assert (len(train), len(test), nb_classes) == (15, 3, 10)
    x, y = test[2]
    assert x.shape == (3, 32, 32) and y == 9


def write_folder(root, classes, per_class=2, size=40):
    for split in ('train', 'val'):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                Image.new('RGB', (size, size), (i * 50, 0, 0)).save(root / split / c / f'{i}.png')


def test_folder_counts_classes_and_imnet_wants_1000(tmp_path):
    write_folder(tmp_path, ['cat', 'dog', 'eel'])
    ds, nb = datasets.build_dataset(False, make_args(data_set='FOLDER', data_path=str(tmp_path), input_size=48))
    assert nb == 3 and len(ds) == 6
    assert ds[0][0].shape == (3, 48, 48)
    with pytest.raises(datasets.DataSetError, match='1000 class folders'):
        datasets.build_dataset(True, make_args(data_set='IMNET', data_path=str(tmp_path)))
    with pytest.raises(datasets.DataSetError, match=str(tmp_path / 'nothing' / 'train')):
        datasets.build_dataset(True, make_args(data_set='FOLDER', data_path=str(tmp_path / 'nothing')))


def test_eval_transform_resizes_by_crop_ratio_then_center_crops():
    t = datasets.build_transform(False, make_args(input_size=64))
    # a 146x146 image with a bright 2x-scaled border: resize to int(64 / 0.875) = 73, crop the middle 64
    img = np.zeros((146, 146, 3), np.uint8)
    img[:, :18] = 255  # left 18 px -> 9 px after the resize; the crop starts at (73 - 64) // 2 = 4
    out = t(Image.fromarray(img))
    assert out.shape == (3, 64, 64)
    mean_col = out.mean(dim=(0, 1))
    assert mean_col[:4].min() > 1.5 and mean_col[6:].max() < -1.5  # bright, then dark (normalised)


def test_randaugment_magnitude_10_posterize_gives_black_image():
    # DeiT's rand-m9-mstd0.5-inc1 draws magnitudes up to 10, where PosterizeIncreasing keeps 0 bits.
    # Pillow 13 raises there (a crash mid-epoch), Pillow 12 returns black: vim_requirements.txt pins 12.
    ra = rand_augment_transform('rand-m10-mstd0-inc1', {})
    (op,) = [o for o in ra.ops if o.name == 'PosterizeIncreasing']
    op.prob = 1.0
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))
    assert np.asarray(op(img)).max() == 0


def test_default_deit_train_transform_shapes():
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    t = datasets.build_transform(True, make_args(input_size=32))
    assert {tuple(t(img).shape) for _ in range(50)} == {(3, 32, 32)}
    t224 = datasets.build_transform(True, make_args(input_size=224))
    assert t224(img).shape == (3, 224, 224)


def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    # a mistyped --data-path: the download is tried there and fails; the folders made for it are removed
    class FailingDownload:
        def __init__(self, root, train, download):
            open(os.path.join(root, 'cifar-100-python.tar.gz'), 'wb').close()  # a partial download
            raise OSError('no route to host')
    layout = dict(datasets._CIFAR_LAYOUT)
    layout['CIFAR'] = layout['CIFAR'][:2] + (FailingDownload,)
    monkeypatch.setattr(datasets, '_CIFAR_LAYOUT', layout)
    (tmp_path / 'datasets').mkdir()
    for typo in (tmp_path / 'datsets' / 'cifar-100-python', tmp_path / 'datasets' / 'cifar100' / 'x'):
        with pytest.raises(datasets.DataSetError, match='download failed: OSError: no route to host'):
            datasets.resolve_cifar_folder(str(typo), 'CIFAR', download=True)
        assert os.listdir(tmp_path) == ['datasets'] and os.listdir(tmp_path / 'datasets') == []
    # an existing folder stays (with what the download left in it)
    with pytest.raises(datasets.DataSetError, match='download failed'):
        datasets.resolve_cifar_folder(str(tmp_path / 'datasets'), 'CIFAR', download=True)
    assert os.listdir(tmp_path / 'datasets') == ['cifar-100-python.tar.gz']
