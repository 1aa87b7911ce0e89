"""Launching the Triton kernels with little host time.

``kernel[grid](*args, **meta)`` works out on every call how the arguments specialise the kernel, finds the
compiled kernel and builds the launch: with these kernels' 10-40 arguments that is most of the host time of an
eager training step (tens of microseconds per launch on the H200 machine, 5 launches per layer and more in
fused layers). ``Launcher(kernel)[grid](*args, **meta)`` does the same launch: it keys the compiled kernel by
what Triton specialises on (each tensor's dtype and 16-byte alignment, each integer's width, divisibility by
16 and being 1, except where the kernel says do_not_specialize / do_not_specialize_on_alignment, plus the
keyword arguments), compiles it through ``kernel[grid]`` the first time, and afterwards calls the compiled
kernel directly. Triton's interpreter (the CPU tests) always takes ``kernel[grid]``.
"""
import os

import torch

# Whether the kernels run in Triton's interpreter (the CPU tests), which runs no PTX and not every dot precision
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Launcher:
    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}
        params = getattr(kernel, "params", None)   # none in Triton's interpreter: nothing is cached there
        self.specialised = None if params is None else [
            (p.do_not_specialize, p.do_not_specialize_on_alignment) for p in params if not p.is_constexpr]
        self.constexprs = [] if params is None else [p.name for p in params if p.is_constexpr]
        if params is not None and any(p.is_constexpr for p in params[:len(params) - len(self.constexprs)]):
            raise TypeError(f"{kernel.__name__}: Launcher takes kernels whose constexpr arguments come last")

    def key(self, args, meta):
        """What decides the compiled kernel for these arguments (the first one's device, then one entry per
        argument, then the keyword arguments)."""
        key = [getattr(args[0], "device", None)]
        for arg, (plain, unaligned) in zip(args, self.specialised):
            if isinstance(arg, torch.Tensor):
                key.append((arg.dtype, unaligned or arg.data_ptr() % 16 == 0))
            elif isinstance(arg, bool) or not isinstance(arg, int):
                key.append((type(arg), arg))
            else:
                wide = not -2 ** 31 <= arg < 2 ** 31
                key.append(wide if plain else (wide, arg == 1, arg % 16 == 0))
        return tuple(key) + tuple(meta.items())

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
            if len(args) != len(self.specialised):
                raise TypeError(f"{self.kernel.__name__} takes {len(self.specialised)} positional arguments, "
                                f"got {len(args)}")
            compiled = self.kernel[grid](*args, **meta)
            self.compiled[key] = compiled, [meta[name] for name in self.constexprs]
            return
        compiled, constexprs = found
        compiled[grid](*args, *constexprs)
