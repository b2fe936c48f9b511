"""Let the stock `lm_eval` command find `--model spikegpt` (lm-eval 0.4.13 has no plug-in entry points).

`python -m eval.lm_eval_hook install` writes spikedistill_lm_eval.pth into the environment's site-packages;
its one line runs `install_hook()` at interpreter start-up. The hook is cheap (no torch, no lm_eval import):
it only waits for `lm_eval.api.registry` to be imported, then loads lm-eval's own model table
(`lm_eval.models`, which registers `hf`, `dummy`, `vllm`, ... as lazy placeholders) and only after that adds
"spikegpt" as a lazy placeholder for eval.harness:SpikeGPTLM. The order matters: lm-eval 0.4.13's
`get_model` loads its built-in table only while the registry is empty, so a name registered first would hide
every built-in model (`lm_eval --model hf` would fail with KeyError).
`python -m eval.lm_eval_hook uninstall` removes the file.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

MODEL_NAME = "spikegpt"
TARGET = "eval.harness:SpikeGPTLM"
WATCHED = "lm_eval.api.registry"
BUILTIN_MODELS = "lm_eval.models"
PTH_NAME = "spikedistill_lm_eval.pth"
PTH_LINE = "import eval.lm_eval_hook as _h; _h.install_hook()\n"


def register(registry_module) -> None:
    """Register the spikegpt placeholder in lm-eval's model registry, after lm-eval's built-in models
    (idempotent)."""
    importlib.import_module(BUILTIN_MODELS)
    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers the placeholder in the freshly executed module."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register(module)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    """Meta-path finder that only intercepts the import of lm_eval.api.registry, once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install_hook() -> None:
    """Arrange for "spikegpt" to be registered whenever lm-eval's registry is (or was already) imported."""
    if WATCHED in sys.modules:
        register(sys.modules[WATCHED])
    elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())


def pth_path(site_dir: str | None = None) -> Path:
    return Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="install the lm_eval --model spikegpt start-up hook")
    parser.add_argument("action", choices=["install", "uninstall"])
    parser.add_argument("--site-dir", help="site-packages directory (default: this interpreter's)")
    args = parser.parse_args(argv)
    path = pth_path(args.site_dir)
    if args.action == "install":
        path.write_text(PTH_LINE)
        print(f"wrote {path}")
    elif path.exists():
        path.unlink()
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
