"""train_one_epoch / evaluate with toy models whose numbers can be computed by hand."""
import math

import pytest
import torch

import engine


class Fixed(torch.nn.Module):
    """Returns the logits stored for each input id (inputs are ids)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return self.logits[ids.long()] + self.w


def test_evaluate_counts_top1_top5_and_mean_loss():
    logits = torch.tensor([[0., 1, 2, 3, 4, 5, 6],    # target 6: top-1 hit
                           [6., 5, 4, 3, 2, 1, 0],    # target 4: 5th best -> top-5 only
                           [6., 5, 4, 3, 2, 1, 0],    # target 5: 6th best -> miss
                           [0., 0, 0, 0, 0, 0, 9]])   # target 6: hit
    targets = torch.tensor([6, 4, 5, 6])
    loader = [(torch.tensor([0, 1]), targets[:2]), (torch.tensor([2, 3]), targets[2:])]
    stats = engine.evaluate(loader, Fixed(logits), torch.device('cpu'))
    # the mean cross-entropy in float64 from its definition; evaluate's per-batch float32 sums round differently
    # from any one-call float32 reference (where the exp/log kernels of the CPU put the last bits), so compare at
    # float32 precision rather than bit for bit
    expected_loss = sum(math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in
                        zip(logits.double().tolist(), targets.tolist())) / 4
    assert stats['acc1'] == 50.0 and stats['acc5'] == 75.0 and stats['images'] == 4
    assert stats['loss'] == pytest.approx(expected_loss, rel=1e-6)


def make_step(losses):
    """A step that returns the given losses in turn (and records that it was called)."""
    it = iter(losses)
    calls = []

    def step(samples, targets):
        calls.append(samples.shape[0])
        return torch.tensor(next(it))
    return step, calls


def toy_loader(steps, batch=4):
    return [(torch.zeros(batch, 3), torch.zeros(batch, dtype=torch.long)) for _ in range(steps)]


def test_train_one_epoch_averages_losses_and_prints_progress(capsys):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    losses = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    step, calls = make_step(losses)
    stats = engine.train_one_epoch(model, step, toy_loader(7), opt, torch.device('cpu'), 3, print_freq=3)
    assert stats['loss'] == pytest.approx(4.0) and stats['lr'] == 0.25
    assert stats['steps'] == 7 and stats['images'] == 28 and calls == [4] * 7
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('Epoch: [3]')]
    assert len(lines) == 3  # at steps 3, 6 and the last step 7
    assert '[3/7]' in lines[0] and 'loss: 2.0000 (2.0000)' in lines[0]
    assert 'loss: 5.0000 (3.5000)' in lines[1] and 'loss: 7.0000 (4.0000)' in lines[2]
    assert all('lr: 0.250000' in ln and 'img/s:' in ln and 'eta:' in ln for ln in lines)


def test_non_finite_loss_stops_unless_continue_is_asked():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = [1.0, float('nan'), 3.0, float('inf')]
    step, calls = make_step(losses)
    with pytest.raises(engine.NonFiniteLossError, match='not finite'):
        engine.train_one_epoch(model, step, toy_loader(4), opt, torch.device('cpu'), 0, print_freq=2)
    assert len(calls) == 2  # stopped at the first print point after the NaN
    step, _ = make_step(losses)
    stats = engine.train_one_epoch(model, step, toy_loader(4), opt, torch.device('cpu'), 0, print_freq=2,
                                   if_continue_inf=True)
    assert stats['nonfinite_steps'] == 2 and stats['loss'] == pytest.approx(2.0)  # mean of the finite ones


def test_train_step_matches_a_manual_sgd_step():
    # whichever build_train_step engine.py holds must do forward, backward, step and zero_grad
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    step = engine.build_train_step(model, torch.nn.CrossEntropyLoss(), opt, amp_dtype=None, loss_scaler=None,
                                   clip_grad=None, cuda_graph=False)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    loss = step(x, y)
    ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    assert loss.dim() == 0 and loss.item() == pytest.approx(ref_loss.item())
    assert torch.allclose(model.weight, ref.weight)
    assert model.weight.grad is None or not model.weight.grad.any()  # gradients zeroed for the next step


@pytest.mark.parametrize('kind', ['eager', 'captured-uncaptured'])
@pytest.mark.parametrize('clip_grad', [None, 1.0])
def test_if_continue_inf_skips_a_step_whose_gradients_are_not_finite(kind, clip_grad):
    """fp32, no loss scaler: a batch with a NaN gives NaN gradients; with skip_nonfinite (--if_continue_inf) that
    step changes neither the weights nor AdamW's state, so training goes on exactly as without that batch."""
    def run(batches, skip):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        if kind == 'eager':
            step = engine.EagerTrainStep(model, torch.nn.CrossEntropyLoss(), opt, None, None, clip_grad, skip)
        else:  # the captured step's parts run eagerly (capture=False), as its CPU tests do
            step = engine.CapturedTrainStep(model, torch.nn.CrossEntropyLoss(), opt, None, None, clip_grad,
                                            capture=False, skip_nonfinite=skip)
        for x, y in batches:
            step(x, y)
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()['state']
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(4)]
    poisoned = batches[:2] + [(torch.full((4, 3), math.nan), batches[0][1])] + batches[2:]
    want, want_state = run(batches, skip=True)
    got, got_state = run(poisoned, skip=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert [s['step'] for s in got_state.values()] == [s['step'] for s in want_state.values()] == [4.0, 4.0]
    unguarded, _ = run(poisoned, skip=False)  # the update of the NaN step ruins the weights for good
    assert not all(torch.isfinite(p).all() for p in unguarded)
