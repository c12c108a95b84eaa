"""qpeft-deploy: Quantum-PEFT adapters (orthogonal circuits + a diagonal spectrum) from training to deployment.

Importing the package stays light (no torch): the PEFT method (``qpeft_deploy.peft_native``) is registered with
PEFT the moment ``peft`` itself is imported, or now if it already was, so that after ``import qpeft_deploy``
``PeftModel.from_pretrained`` reads a Quantum-PEFT folder.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
PEFT_METHOD = "qpeft_deploy.peft_native"


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds ``peft`` with the normal finders and registers the method once its module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        index = sys.meta_path.index(self)
        del sys.meta_path[index]  # let the normal finders find it (find_spec alone must not end the watch)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(index, self)
        if spec is not None and spec.loader is not None:
            run_module = spec.loader.exec_module

            def run_then_register(module):
                run_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _register()

            spec.loader.exec_module = run_then_register
        return spec


def _register() -> None:
    """Register the PEFT method; a peft outside the supported range only gets a warning, never a failed import."""
    try:
        importlib.import_module(PEFT_METHOD)
    except Exception as e:  # noqa: BLE001 - importing peft must keep working whatever happens here
        import warnings

        warnings.warn(f"qpeft_deploy: the PEFT method is not registered: {e}", stacklevel=2)


if "peft" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterPeftImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeftImport())
