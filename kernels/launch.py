"""Launching the Triton kernels with little host time.

``kernel[grid](*args, **meta)`` works out on every call how the arguments specialise the kernel, finds the
compiled kernel and builds the launch: with these kernels' 10-40 arguments that is most of the host time of an
eager training step (tens of microseconds per launch on the H200 machine, 5 launches per layer and more in
fused layers). ``Launcher(kernel)[grid](*args, **meta)`` does the same launch: it keys the compiled kernel by
what Triton specialises on (each tensor's dtype and 16-byte alignment, each integer's width, divisibility by
16 and being 1, except where the kernel says do_not_specialize / do_not_specialize_on_alignment, plus the
keyword arguments), compiles it through ``kernel[grid]`` the first time, and afterwards calls the compiled
kernel directly. With Triton 3.6 (torch 2.11's), whose launch path is known here, that call goes straight to the
compiled kernel's C launcher (``_direct``) rather than through ``compiled[grid]``, which on every launch builds a
closure, asks for the device, builds launch metadata for the (empty) launch hooks and calls them. Triton's
interpreter (the CPU tests) always takes ``kernel[grid]``.
"""
import inspect
import os
from operator import attrgetter, itemgetter

import torch

# Whether the kernels run in Triton's interpreter (the CPU tests), which runs no PTX and not every dot precision
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_DTYPE = attrgetter("dtype")


def cdiv(a, b):
    """ceil(a / b) for host code: Triton 3.6's triton.cdiv and next_power_of_2 are constexpr functions, whose
    every host call unwraps its arguments in Python first."""
    return -(-a // b)


def next_power_of_2(n):
    return 1 << (n - 1).bit_length()


def row_block(c, channels_per_warp):
    """Launch settings of a kernel that takes rows of c channels: BLOCK, the power of two holding a row, and one warp
    per ``channels_per_warp`` of it (1 to 8)."""
    block = next_power_of_2(c)
    return dict(BLOCK=block, num_warps=max(1, min(block // channels_per_warp, 8)))


def _direct(compiled):
    """compiled[grid](*args) as ``launch(grid, *args)`` that calls the C launcher of Triton 3.6's CUDA backend with
    what its runner would pass (the current device's stream, no launch metadata, no hooks), or None where that
    launcher is not the one known here or needs what the runner does (scratch memory)."""
    import triton
    if not triton.__version__.startswith("3.6.") or not hasattr(compiled, "packed_metadata"):
        return None
    run = compiled.run   # loads the kernel
    call = getattr(type(run), "__call__", None)
    if (call is None or list(inspect.signature(call).parameters) != ["self", "gridX", "gridY", "gridZ", "stream",
                                                                      "function", "args"]
            or not hasattr(run, "launch") or run.global_scratch_size or run.profile_scratch_size):
        return None
    c_launch, function, metadata = run.launch, compiled.function, compiled.packed_metadata
    cooperative, pdl = run.launch_cooperative_grid, run.launch_pdl
    runtime = triton.knobs.runtime
    stream, device = torch._C._cuda_getCurrentRawStream, torch.cuda.current_device

    def launch(grid, *args):
        if getattr(runtime.launch_enter_hook, "calls", True) or getattr(runtime.launch_exit_hook, "calls", True):
            # a profiler is listening to launches (or the hooks are not the chains known here)
            compiled[grid](*args)
            return
        c_launch(grid[0], grid[1], grid[2], stream(device()), function, cooperative, pdl, None, None, metadata,
                 None, None, None, *args)
    return launch


def _picker(positions):
    """args -> the tuple of args at these positions (C-speed itemgetter, which returns a bare item for one)."""
    if len(positions) == 1:
        i, = positions
        return lambda args: (args[i],)
    return itemgetter(*positions) if positions else lambda args: ()


class Launcher:
    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled, self.plans = {}, {}
        params = getattr(kernel, "params", None)   # none in Triton's interpreter: nothing is cached there
        self.specialised = None if params is None else [
            (p.do_not_specialize, p.do_not_specialize_on_alignment) for p in params if not p.is_constexpr]
        self.constexprs = [] if params is None else [p.name for p in params if p.is_constexpr]
        if params is not None and any(p.is_constexpr for p in params[:len(params) - len(self.constexprs)]):
            raise TypeError(f"{kernel.__name__}: Launcher takes kernels whose constexpr arguments come last")

    def key(self, args, meta):
        """What decides the compiled kernel for these arguments: their types, the first tensor's device, each
        tensor's dtype (and 16-byte alignment where specialised), each specialised integer's width, divisibility by
        16 and being 1, whether any other integer needs 64 bits, the values of the rest, the keyword arguments.
        Which argument is which is worked out once per tuple of argument types (``_plan``), so that a launch pays a
        few list comprehensions rather than a Python loop over its 10-40 arguments."""
        types = tuple(map(type, args))
        plan = self.plans.get(types)
        if plan is None:
            plan = self.plans[types] = self._plan(types)
        tensors, aligned, ints, plain, rest = (get(args) for get in plan)
        plain = plain or (0,)
        return (types, tensors[0].device if tensors else None, tuple(map(_DTYPE, tensors)),
                tuple([t.data_ptr() % 16 == 0 for t in aligned]),
                tuple([(not -2 ** 31 <= a < 2 ** 31, a == 1, a % 16 == 0) for a in ints]),
                not -2 ** 31 <= min(plain) <= max(plain) < 2 ** 31, rest, *meta.items())

    def _plan(self, types):
        """For arguments of these types, one function per role that picks those arguments (tensors, tensors
        specialised on alignment, specialised integers, plain integers, the rest)."""
        if len(types) != len(self.specialised):
            raise TypeError(f"{self.kernel.__name__} takes {len(self.specialised)} positional arguments, "
                            f"got {len(types)}")
        roles = ([], [], [], [], [])
        for i, (kind, (plain, unaligned)) in enumerate(zip(types, self.specialised)):
            if issubclass(kind, torch.Tensor):
                roles[0].append(i)
                if not unaligned:
                    roles[1].append(i)
            elif issubclass(kind, int) and not issubclass(kind, bool):
                roles[3 if plain else 2].append(i)
            else:
                roles[4].append(i)
        return [_picker(role) for role in roles]

    def __getitem__(self, grid):
        grid = tuple(grid) + (1,) * (3 - len(grid))   # the compiled kernel's launcher takes three
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args, meta):
        if self.specialised is None:
            self.kernel[grid](*args, **meta)
            return
        key = self.key(args, meta)
        found = self.compiled.get(key)
        if found is None:
            compiled = self.kernel[grid](*args, **meta)
            direct = _direct(compiled)
            self.compiled[key] = (direct or (lambda grid, *args: compiled[grid](*args)),
                                  [meta[name] for name in self.constexprs])
            return
        launch, constexprs = found
        launch(grid, *args, *constexprs)
