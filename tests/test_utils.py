"""Checkpoint helpers: atomic saves, pos_embed moves, fine-tune loading; time format; git commit."""
import json
import os
import stat
import subprocess
import sys

import pytest
import timm
import torch

import models_mamba  # noqa: F401
import utils

TINY = dict(depth=2, embed_dim=16, patch_size=8, img_size=32, ssm_backend='torch')
NAME = 'vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2'


def test_format_hms_matches_paper_style():
    assert utils.format_hms(4 * 3600 + 33 * 60 + 2) == '4:33:02'
    assert utils.format_hms(59.6) == '0:01:00'


def test_atomic_save_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    utils.atomic_torch_save({'epoch': 1}, str(path))
    assert torch.load(path)['epoch'] == 1
    with pytest.raises(Exception):
        utils.atomic_torch_save({'epoch': 2, 'bad': lambda: 0}, str(path))  # lambdas cannot be pickled
    assert torch.load(path)['epoch'] == 1  # the good file survives a failed save
    assert os.listdir(tmp_path) == ['checkpoint.pth']  # and no temp file is left behind


def test_atomic_writes_get_the_modes_of_plain_files(tmp_path):
    old = os.umask(0o027)
    try:
        utils.atomic_torch_save({'epoch': 0}, str(tmp_path / 'c.pth'))
        utils.atomic_write_json({'a': 1}, str(tmp_path / 's.json'))
        utils.atomic_write_json_lines([{'epoch': 0}, {'epoch': 1}], str(tmp_path / 'log.txt'))
        with open(tmp_path / 'plain', 'w'):
            pass
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {'c.pth': 0o640, 's.json': 0o640, 'log.txt': 0o640, 'plain': 0o640}  # 0666 less the umask
    assert [json.loads(ln) for ln in open(tmp_path / 'log.txt')] == [{'epoch': 0}, {'epoch': 1}]


def test_a_kill_before_the_rename_leaves_only_a_temp_file_which_is_cleaned(tmp_path):
    # a real SIGKILL inside the atomic save (fault point before os.replace): the old file survives,
    # the temp file stays behind, and remove_stale_temp_files clears it (and nothing else)
    utils.atomic_write_json({'v': 1}, str(tmp_path / 'summary.json'))
    code = f'import utils; utils.atomic_write_json({{"v": 2}}, {str(tmp_path / "summary.json")!r})'
    env = dict(os.environ, FAMBA_V_FAULT='before_replace:summary.json')
    proc = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.abspath(utils.__file__)), env=env)
    assert proc.returncode == -9
    assert json.load(open(tmp_path / 'summary.json')) == {'v': 1}
    (tmp,) = [p for p in os.listdir(tmp_path) if p != 'summary.json']
    assert tmp.startswith('.tmp-') and tmp.endswith('.json')
    (tmp_path / 'other.txt').write_text('x')
    assert utils.remove_stale_temp_files(str(tmp_path)) == [tmp]
    assert sorted(os.listdir(tmp_path)) == ['other.txt', 'summary.json']


def test_git_commit_of_a_checkout_and_of_a_plain_folder(tmp_path, monkeypatch):
    repo = os.path.dirname(os.path.abspath(utils.__file__))
    try:
        expected = subprocess.run(['git', '-C', repo, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                  check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        expected = None
    commit, dirty = utils.git_commit(repo)
    assert commit == expected and (dirty is None) == (expected is None)
    assert utils.git_commit(str(tmp_path)) == (None, None)  # not a checkout
    monkeypatch.setenv('PATH', str(tmp_path))  # no git at all
    assert utils.git_commit(repo) == (None, None)


def test_resample_pos_embed_moves_the_class_token():
    m = 16
    pe = torch.arange(m + 1, dtype=torch.float32).view(1, m + 1, 1).repeat(1, 1, 3)
    pe[:, m // 2] = -1.0  # class token in the middle, as in Vim's checkpoints
    out = utils.resample_pos_embed(pe, m // 2, 0, m)
    assert out[0, 0, 0] == -1.0
    expected_patches = [i for i in range(m + 1) if i != m // 2]
    assert out[0, 1:, 0].tolist() == expected_patches
    back = utils.resample_pos_embed(out, 0, m // 2, m)
    assert torch.equal(back, pe)


def test_resample_pos_embed_interpolates_the_grid():
    # a grid constant along rows (value = row) stays constant along rows after a bicubic resize,
    # and the class-token row is carried over untouched
    grid = torch.arange(4, dtype=torch.float32).view(4, 1).expand(4, 4).reshape(1, 16, 1)
    pe = torch.cat([torch.full((1, 1, 1), 7.0), grid], dim=1)
    out = utils.resample_pos_embed(pe, 0, 0, 64)
    assert out.shape == (1, 65, 1) and out[0, 0, 0] == 7.0
    rows = out[0, 1:, 0].view(8, 8)
    assert torch.allclose(rows, rows[:, :1].expand(8, 8))
    assert rows[0, 0] < rows[3, 0] < rows[7, 0]
    with pytest.raises(ValueError, match='square grid'):
        utils.resample_pos_embed(torch.zeros(1, 11, 2), 0, 0, 16)


def test_finetune_from_middle_token_checkpoint_into_head_model():
    src = timm.create_model(NAME, num_classes=10, cls_position='middle', **TINY)
    dst = timm.create_model(NAME, num_classes=5, cls_position='head', **TINY)
    head_before = dst.head.weight.clone()
    dropped = utils.load_finetune_state(dst, {'model': src.state_dict()}['model'], 'middle')
    assert dropped == ['head.weight', 'head.bias']
    assert torch.equal(dst.head.weight, head_before)  # new head keeps its own initialisation
    m = src.patch_embed.num_patches
    assert torch.equal(dst.pos_embed[0, 0], src.pos_embed[0, m // 2])
    assert torch.equal(dst.pos_embed[0, 1:], torch.cat([src.pos_embed[0, :m // 2], src.pos_embed[0, m // 2 + 1:]]))
    assert torch.equal(dst.layers[1].mixer.in_proj.weight, src.layers[1].mixer.in_proj.weight)


def test_finetune_names_keys_that_do_not_fit():
    src = timm.create_model(NAME, num_classes=10, **TINY).state_dict()
    dst = timm.create_model(NAME, num_classes=10, **TINY)
    src['extra.weight'] = torch.zeros(1)
    del src['norm_f.weight']
    src['layers.0.mixer.D'] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        utils.load_finetune_state(dst, src, 'head')
    msg = str(err.value)
    assert msg == ('checkpoint does not fit the model: missing keys (1): norm_f.weight; unexpected keys (1): '
                   'extra.weight; size mismatch (1): layers.0.mixer.D: checkpoint (3,) vs model (32,)')
    shallow = {k: v for k, v in dst.state_dict().items() if not k.startswith('layers.1.')}
    misfit = utils.state_dict_misfit(dst.state_dict(), shallow)
    assert misfit.startswith('missing keys (17): layers.1.') and misfit.count('layers.1.') == 3
    assert misfit.endswith('...')
