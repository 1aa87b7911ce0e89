"""kernels/launch.py's Launcher against a stand-in kernel that records how it is called: it compiles through
kernel[grid] exactly when Triton would specialise differently, and otherwise calls the compiled kernel with the
constexprs in signature order."""
import torch

from kernels.launch import Launcher


class Param:
    def __init__(self, name, constexpr=False, plain=False, unaligned=False):
        self.name, self.is_constexpr = name, constexpr
        self.do_not_specialize, self.do_not_specialize_on_alignment = plain, unaligned


class Compiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("run", grid, args))


class Kernel:
    __name__ = "stand_in"

    def __init__(self, params):
        self.params, self.log = params, []

    def __getitem__(self, grid):
        def compile_and_launch(*args, **meta):
            self.log.append(("compile", grid, args, meta))
            return Compiled(self.log)
        return compile_and_launch


def test_launcher_compiles_once_per_specialisation_and_runs_the_compiled_kernel():
    kernel = Kernel([Param("x_ptr"), Param("y_ptr", unaligned=True), Param("n"), Param("s", plain=True),
                     Param("BLOCK", constexpr=True), Param("MODE", constexpr=True)])
    launch = Launcher(kernel)
    x = torch.zeros(64)
    y = torch.zeros(64)
    launch[(4,)](x, y, 32, 7, BLOCK=16, MODE=1, num_warps=2)
    launch[(8,)](x, y[1:], 48, 9, BLOCK=16, MODE=1, num_warps=2)   # y's alignment and s are not specialised
    assert [e[0] for e in kernel.log] == ["compile", "run"]
    _, grid, args = kernel.log[1]
    assert grid == (8, 1, 1) and args[0] is x and args[1].data_ptr() == y[1:].data_ptr() and args[2:] == (48, 9, 16, 1)
    for args, meta in [((x[1:], y, 32, 7), {}),                 # x no longer 16-byte aligned
                       ((x, y, 33, 7), {}),                     # n no longer divisible by 16
                       ((x, y, 1, 7), {}),                      # n == 1 is a constant to Triton
                       ((x, y, 32, 2 ** 40), {}),               # s needs 64 bits
                       ((x.double(), y, 32, 7), {}),            # another dtype
                       ((x, None, 32, 7), {}),                  # no tensor for y: another argument type
                       ((x, y, 32, 7), {"MODE": 2})]:           # another constexpr
        before = len(kernel.log)
        launch[(4,)](*args, **{"BLOCK": 16, "MODE": 1, "num_warps": 2, **meta})
        assert kernel.log[before][0] == "compile", (args, meta)
    launch[(4,)](x, y, 32, 7, BLOCK=16, MODE=1, num_warps=4)    # another launch option
    assert kernel.log[-1][0] == "compile"
    launch[(2,)](x, y, 64, 2 ** 40 + 1, BLOCK=16, MODE=1, num_warps=2)   # specialised as an earlier call
    assert kernel.log[-1] == ("run", (2, 1, 1), (x, y, 64, 2 ** 40 + 1, 16, 1))
