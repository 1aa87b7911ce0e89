"""Data sets and DeiT transforms.

--data-set CIFAR    CIFAR-100, python version: a folder with the pickles train, test, meta
                    (--data-path may name that folder or its parent; downloaded there if missing)
--data-set CIFAR10  CIFAR-10, python version (cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta)
--data-set IMNET    ImageNet-1k as image folders: <data-path>/train/<class>/*, <data-path>/val/<class>/*
--data-set FOLDER   any image-folder data set laid out like IMNET; classes are the train/ subfolders
"""
import os
import pickle
import shutil

import numpy as np
import torch.distributed as dist
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import datasets, transforms

import utils

DATA_SETS = ('CIFAR', 'CIFAR10', 'IMNET', 'FOLDER')

# name of the extracted folder, pickles that must be present, torchvision class that downloads it
_CIFAR_LAYOUT = {
    'CIFAR': ('cifar-100-python', ('train', 'test', 'meta'), datasets.CIFAR100),
    'CIFAR10': ('cifar-10-batches-py',
                tuple(f'data_batch_{i}' for i in range(1, 6)) + ('test_batch', 'batches.meta'),
                datasets.CIFAR10),
}


class DataSetError(RuntimeError):
    """The data set is missing or not laid out as expected."""


def _unpickle(path):
    # The official files are Python 2 pickles: latin1 turns their str keys into str; bytes keys
    # (pickles re-saved from Python 3) are decoded too.
    with open(path, 'rb') as f:
        entry = pickle.load(f, encoding='latin1')
    if not isinstance(entry, dict):
        raise DataSetError(f'{path}: expected a pickled dict, got {type(entry).__name__}')
    return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in entry.items()}


class CIFARPickles(Dataset):
    """CIFAR-10/100 read straight from the python-version pickles (N x 3072 uint8 rows, RGB planes)."""

    def __init__(self, folder, name, train, transform=None):
        if name == 'CIFAR':
            files = ['train'] if train else ['test']
            label_key, names = 'fine_labels', _unpickle(os.path.join(folder, 'meta'))['fine_label_names']
        else:
            files = [f'data_batch_{i}' for i in range(1, 6)] if train else ['test_batch']
            label_key, names = 'labels', _unpickle(os.path.join(folder, 'batches.meta'))['label_names']
        data, labels = [], []
        for file in files:
            entry = _unpickle(os.path.join(folder, file))
            data.append(np.asarray(entry['data'], dtype=np.uint8))
            labels.extend(int(y) for y in entry[label_key])
        data = np.concatenate(data)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
            raise DataSetError(f'{folder}: expected "data" of shape (N, 3072) with N labels, '
                               f'got {data.shape} and {len(labels)} labels')
        self.images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = labels
        self.classes = [n.decode('latin1') if isinstance(n, bytes) else n for n in names]
        if labels and not 0 <= min(labels) <= max(labels) < len(self.classes):
            raise DataSetError(f'{folder}: labels outside 0..{len(self.classes) - 1}')
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def _has_files(folder, files):
    return all(os.path.isfile(os.path.join(folder, f)) for f in files)


def _topmost_missing(path):
    """The outermost folder of ``path`` that does not exist yet (what makedirs would create), or None."""
    top = None
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    return top


def resolve_cifar_folder(data_path, name, download=True):
    """Folder holding the CIFAR pickles: --data-path itself or <data-path>/<extracted name>.

    If neither holds them, try torchvision's download into the matching root; if that fails, remove the
    folders created for it (a mistyped path leaves nothing behind) and raise DataSetError naming the paths
    looked in and the expected layout.
    """
    folder_name, files, tv_class = _CIFAR_LAYOUT[name]
    data_path = os.path.abspath(os.path.expanduser(data_path))
    candidates = [data_path, os.path.join(data_path, folder_name)]
    for folder in candidates:
        if _has_files(folder, files):
            return folder
    root = os.path.dirname(data_path) if os.path.basename(data_path) == folder_name else data_path
    target = os.path.join(root, folder_name)
    reason = 'download not attempted'
    if download:
        print(f'{name}: no data in {data_path}; trying to download it to {target}', flush=True)
        created = _topmost_missing(root)
        try:
            os.makedirs(root, exist_ok=True)
            tv_class(root, train=True, download=True)
        except Exception as e:  # no route, proxy, disk, checksum...: all end in the same message
            reason = f'download failed: {type(e).__name__}: {e}'
        if _has_files(target, files):
            return target
        if created is not None:  # a failed download into a (possibly mistyped) path leaves no folders behind
            shutil.rmtree(created, ignore_errors=True)
    raise DataSetError(
        f'{name} data set not found. Looked in {candidates[0]} and {candidates[1]}; expected the python-version '
        f'pickles {", ".join(files)} in a folder named {folder_name} (extract {folder_name}.tar.gz from '
        f'https://www.cs.toronto.edu/~kriz/cifar.html and pass that folder or its parent as --data-path). '
        f'({reason})')


def _image_folder(root, split, transform):
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DataSetError(f'image folder {path} not found: expected {root}/train/<class>/<images> and '
                           f'{root}/val/<class>/<images>')
    try:
        return datasets.ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataSetError(f'{path}: {e}') from e


def build_dataset(is_train, args):
    """Returns (dataset, number of classes) as DeiT's build_dataset."""
    transform = build_transform(is_train, args)
    if args.data_set in _CIFAR_LAYOUT:
        # one process downloads while the others wait, then everyone reads the same folder
        if utils.is_main_process():
            folder = resolve_cifar_folder(args.data_path, args.data_set)
        if utils.is_dist_avail_and_initialized():
            dist.barrier()
        if not utils.is_main_process():
            folder = resolve_cifar_folder(args.data_path, args.data_set, download=False)
        dataset = CIFARPickles(folder, args.data_set, is_train, transform)
        return dataset, len(dataset.classes)
    if args.data_set == 'IMNET':
        dataset = _image_folder(args.data_path, 'train' if is_train else 'val', transform)
        if len(dataset.classes) != 1000:
            raise DataSetError(f'IMNET expects 1000 class folders in {dataset.root}, found {len(dataset.classes)}')
        return dataset, 1000
    if args.data_set == 'FOLDER':
        dataset = _image_folder(args.data_path, 'train' if is_train else 'val', transform)
        if not is_train:
            train_classes = sorted(e.name for e in os.scandir(os.path.join(args.data_path, 'train')) if e.is_dir())
            if dataset.classes != train_classes:
                raise DataSetError(f'{dataset.root}: class folders differ from those in train/')
        return dataset, len(dataset.classes)
    raise DataSetError(f'unknown --data-set {args.data_set!r}; expected one of {", ".join(DATA_SETS)}')


def build_transform(is_train, args):
    """DeiT's transforms: RandAugment / color jitter / random erasing for training; for evaluation a
    resize to input_size / eval_crop_ratio and a center crop. At 32 px or less (CIFAR at its native
    resolution) images are only resized to input_size and, for training, randomly cropped with 4 px
    padding instead of the random-resized crop, as DeiT does."""
    resize_im = args.input_size > 32
    if is_train:
        aa = None if args.aa in (None, '', 'none', 'None') else args.aa
        transform = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter or None,
            auto_augment=aa, interpolation=args.train_interpolation, re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount)
        if not resize_im:
            transform.transforms[0] = transforms.Compose([
                transforms.Resize(args.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomCrop(args.input_size, padding=4)])
        return transform
    size = int(args.input_size / args.eval_crop_ratio) if resize_im else args.input_size
    t = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
         transforms.CenterCrop(args.input_size)]
    t.append(transforms.ToTensor())
    t.append(transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return transforms.Compose(t)
