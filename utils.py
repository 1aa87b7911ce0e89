"""Distributed setup, seeding, atomic file writes and checkpoint helpers (DeiT conventions)."""
import builtins
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def setup_for_distributed(is_master):
    """Silence print() on non-master processes unless called with force=True."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


def peak_rss_mib():
    """The process's peak resident memory so far in MiB (the CPU's peak memory figure), None where the OS does not
    say (no ``resource`` module)."""
    try:
        import resource
    except ImportError:
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2 ** 20 if sys.platform == 'darwin' else kib / 2 ** 10  # macOS counts bytes, Linux KiB


def slurm_tasks():
    """How many tasks the srun step this process belongs to started (1 outside srun: a plain `python main.py` in a
    batch script, whose environment also holds SLURM_PROCID, is one process)."""
    return int(os.environ.get('SLURM_STEP_NUM_TASKS', 1))


def init_distributed_mode(args):
    """Join the process group described by the launcher's environment (torchrun / launch --use_env, or srun's
    tasks).

    Sets args.distributed, args.rank, args.world_size, args.gpu and args.dist_backend (unset: NCCL on CUDA, gloo on
    the CPU).
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', args.local_rank))
    elif slurm_tasks() > 1:  # srun started one task per process (MASTER_ADDR / MASTER_PORT checked by main.py)
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = slurm_tasks()
        args.gpu = int(os.environ.get('SLURM_LOCALID', 0))
    else:
        print('Not using distributed mode')
        args.distributed = False
        args.rank, args.gpu = 0, 0
        return
    args.distributed = True
    use_cuda = args.device.startswith('cuda')
    args.dist_backend = args.dist_backend or ('nccl' if use_cuda else 'gloo')
    if use_cuda:
        if args.dist_backend == 'gloo':  # gloo lets processes share a GPU: local ranks wrap around the GPUs
            args.gpu %= torch.cuda.device_count()
        torch.cuda.set_device(args.gpu)
    print(f'| distributed init (rank {args.rank}, world {args.world_size}, backend {args.dist_backend}): '
          f'{args.dist_url}', flush=True)
    device_id = {'device_id': torch.device('cuda', args.gpu)} if args.dist_backend == 'nccl' else {}  # NCCL's GPU
    dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank, **device_id)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def seed_everything(*keys):
    """Seed python, numpy and torch from a tuple of ints (e.g. seed, epoch, rank).

    Seeding at every epoch start from (seed, epoch, rank) makes a resumed run draw the same
    data order, augmentations and dropout as an uninterrupted one, without storing RNG states.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    seed = int(state[0]) << 32 | int(state[1])
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def format_hms(seconds):
    """Seconds -> 'H:MM:SS' (the paper's training-time format)."""
    return str(datetime.timedelta(seconds=int(round(seconds))))


TEMP_PREFIX = '.tmp-'
FAULT_ENV = 'FAMBA_V_FAULT'


def fault_point(tag):
    """Fault injection for the tests: SIGKILL this process at the save-path point ``tag`` when the
    comma-separated list in $FAMBA_V_FAULT names it (e.g. FAMBA_V_FAULT=after_checkpoint:1)."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and tag in wanted.split(','):
        os.kill(os.getpid(), signal.SIGKILL)


def _file_mode():
    """0666 less the umask: what open() would give a new file (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic_open(path, mode):
    """Write to a temp file in the target directory, then os.replace: a crash never leaves a
    half-written file under the final name (and never touches the previous one). A kill -9 can
    leave the temp file (.tmp-*) behind: ``remove_stale_temp_files`` clears those at the next start."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=directory)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        fault_point(f'before_replace:{os.path.basename(path)}')
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    with _atomic_open(path, 'wb') as f:
        torch.save(obj, f)


def atomic_write_json(obj, path):
    with _atomic_open(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


def atomic_write_json_lines(records, path):
    """Rewrite ``path`` with one JSON object per line (log.txt), atomically."""
    with _atomic_open(path, 'w') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


def atomic_copy(src, dst):
    with open(src, 'rb') as fin, _atomic_open(dst, 'wb') as fout:
        shutil.copyfileobj(fin, fout, 1 << 24)


def remove_stale_temp_files(directory):
    """Delete the .tmp-* files that a killed save left in ``directory``; returns their names."""
    removed = []
    for entry in os.scandir(directory):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            os.remove(entry.path)
            removed.append(entry.name)
    return sorted(removed)


def git_commit(directory):
    """(commit hash, whether the work tree has uncommitted changes) of the git checkout holding
    ``directory``, or (None, None) when it is not one (or git is missing)."""
    def git(*cmd):
        return subprocess.run(['git', '-C', directory, *cmd], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        commit = git('rev-parse', 'HEAD')
    except (OSError, subprocess.SubprocessError):
        return None, None
    try:
        dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit, dirty


def resample_pos_embed(pos_embed, cls_index_src, cls_index_dst, num_patches_dst):
    """Move a (1, 1 + M, D) position embedding to a model with ``num_patches_dst`` patches.

    The class-token row is taken from ``cls_index_src`` (0 = head, M//2 = Vim's middle token), the
    patch rows are bicubically resized on their square grid, and the class-token row is re-inserted
    at ``cls_index_dst``.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f'pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}')
    tokens = pos_embed.shape[1]
    grid_src = math.isqrt(tokens - 1)
    if grid_src * grid_src != tokens - 1:
        raise ValueError(f'checkpoint pos_embed has {tokens} tokens: expected 1 class token + a square '
                         'grid of patch tokens')
    grid_dst = math.isqrt(num_patches_dst)
    if grid_dst * grid_dst != num_patches_dst:
        raise ValueError(f'model has {num_patches_dst} patches, not a square grid')
    if not 0 <= cls_index_src < tokens or not 0 <= cls_index_dst <= num_patches_dst:
        raise ValueError('class-token index out of range')
    cls = pos_embed[:, cls_index_src:cls_index_src + 1]
    patches = torch.cat([pos_embed[:, :cls_index_src], pos_embed[:, cls_index_src + 1:]], dim=1)
    if grid_src != grid_dst:
        dim = patches.shape[-1]
        grid = patches.reshape(1, grid_src, grid_src, dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(grid_dst, grid_dst), mode='bicubic', align_corners=False)
        patches = grid.permute(0, 2, 3, 1).reshape(1, grid_dst * grid_dst, dim).to(pos_embed.dtype)
    return torch.cat([patches[:, :cls_index_dst], cls, patches[:, cls_index_dst:]], dim=1)


def load_finetune_state(model, state_dict, ckpt_cls_position='middle'):
    """Load a Vim/Famba-V checkpoint state dict into ``model`` for fine-tuning.

    Drops a classifier head whose shape differs from the model's (new number of classes), moves and
    resizes pos_embed (see ``resample_pos_embed``), then loads strictly: any other missing,
    unexpected or mis-shaped key is an error naming those keys. Returns the list of dropped keys.
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    dropped = []
    for key in ('head.weight', 'head.bias'):
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            print(f'Removing key {key} from pretrained checkpoint (shape {tuple(state_dict[key].shape)} '
                  f'vs model {tuple(own[key].shape)})')
            del state_dict[key]
            dropped.append(key)
    if 'pos_embed' in state_dict and 'pos_embed' in own:
        src = state_dict['pos_embed']
        num_patches_src = src.shape[1] - 1
        cls_src = 0 if ckpt_cls_position == 'head' else num_patches_src // 2
        state_dict['pos_embed'] = resample_pos_embed(src, cls_src, model.cls_index_init,
                                                     model.patch_embed.num_patches)
    misfit = state_dict_misfit(own, state_dict, ignore=dropped)
    if misfit:
        raise ValueError(f'checkpoint does not fit the model: {misfit}')
    model.load_state_dict(state_dict, strict=not dropped)
    return dropped


def read_checkpoint(path):
    """torch.load(path) onto the CPU; a file torch cannot read (truncated, not a torch file, unpicklable) raises
    ValueError with one line saying why."""
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f'cannot be read as a checkpoint (truncated, or not written by torch.save): '
                         f'{type(e).__name__}: {reason}') from e


def state_dict_misfit(own, state_dict, ignore=(), shown=3):
    """'' when ``state_dict`` has exactly the keys and shapes of ``own`` (a model's state dict), else one line saying
    how many keys are missing, unexpected or mis-shaped, naming the first ``shown`` of each."""
    missing = sorted(k for k in own if k not in state_dict and k not in ignore)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
                        for k in state_dict if k in own and state_dict[k].shape != own[k].shape)
    parts = [f'{what} ({len(keys)}): {", ".join(keys[:shown])}' + (', ...' if len(keys) > shown else '')
             for what, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                                ('size mismatch', mismatched)) if keys]
    return '; '.join(parts)
