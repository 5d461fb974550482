"""Triton kernels and their launchers (installed as ``fastlm.kernels``).

No autograd and no modules here: a launcher takes tensors, allocates outputs, picks block
sizes and launches. One file per op family; each exposes ``compile_specs()`` for the static
GPU check (``python -m fastlm.kernels.compile_check``).

With the root of a source checkout on ``sys.path`` (Python started there, a notebook,
``fastlm bench``), this folder is also found as a top-level ``kernels``, the name of
Hugging Face's package that transformers imports. Imported under that name, it hands the
import over to the next ``kernels`` on ``sys.path``, or fails as a missing module would.
(Dropping this file instead would make the folder a namespace portion that any installed
``kernels`` outranks, but setuptools' editable finder cannot map a namespace package to
``fastlm.kernels``: pypa/setuptools#4943.)
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over() -> None:
        checkout = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
        elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named 'kernels' ({os.path.dirname(__file__)} is fastlm's "
                "fastlm.kernels, not a top-level package)",
                name=__name__,
            )
        module = importlib.util.module_from_spec(spec)
        # The import statement returns what sys.modules holds once this file has run.
        sys.modules[__name__] = module
        spec.loader.exec_module(module)

    _hand_over()
