"""Installs the megatron CPU shims at interpreter start when OEL_MEGATRON_CPU_SHIMS=1 (tests only).

Use: PYTHONPATH=tests/megatron_support OEL_MEGATRON_CPU_SHIMS=1 python ... (or torchrun / srun). Without the
variable this imports nothing beyond `os`.
"""
import os

if os.environ.get("OEL_MEGATRON_CPU_SHIMS") == "1":
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "_oel_megatron_cpu_shims", os.path.join(os.path.dirname(os.path.abspath(__file__)), "shims.py"))
    _shims = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shims)
    _shims.install()
