"""Compile, once, the DeepSpeed C++ ops that the shipped configs use on this machine, so that the first launch does
not sit silent for a minute or more while DeepSpeed compiles them (it JIT-compiles an op the first time a run needs
it, then reuses the build from TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by default).

    python scripts/build_deepspeed_ops.py        # `make install` runs it

The ops: CPU Adam (the optimizer of every *_offload config), fused Adam (ZeRO-2 and ZeRO-3 without offload) and, on a
machine without GPUs, the shared-memory all-reduce DeepSpeed's CPU backend uses. An op that cannot be built here
(no compiler, no CUDA toolkit) is reported and skipped: DeepSpeed tries again when a run needs it, and says why it fails.
"""

import sys
import time

OPS = ["CPUAdamBuilder", "FusedAdamBuilder"]
CPU_ONLY_OPS = ["ShareMemCommBuilder"]


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    from vlm_recipes.ds_config import arch_list_deepspeed_can_parse

    # the same TORCH_CUDA_ARCH_LIST the recipes compile with ("9.0a" -> "9.0"), so that their runs reuse these builds
    if plain := arch_list_deepspeed_can_parse():
        print(
            f"TORCH_CUDA_ARCH_LIST={plain} (DeepSpeed 0.19.8 cannot parse architecture variants)", flush=True
        )

    accelerator = get_accelerator()
    names = OPS + (CPU_ONLY_OPS if accelerator.device_name() == "cpu" else [])
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"{name}: not available for {accelerator.device_name()}, skipped", flush=True)
            continue
        start = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as error:  # noqa: BLE001 - best effort: a run that needs the op will build it and say why
            print(
                f"{name}: could not be built here ({type(error).__name__}: {error}); DeepSpeed will try at first use"
            )
            continue
        print(f"{name}: ready ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
