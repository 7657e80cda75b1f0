"""Build and install amflow_kernels (and, from the model-package issue on, python/amflow_models).

``pip install .`` installs the Python package; the Triton and reference backends need no
compilation. The compiled extension (csrc/) is added by the next issue.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="amflow-kernels",
    version="0.1.0",
    description="Fused GPU kernels for AM flow: motion from the attention maps of frozen image ViTs",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["amflow_kernels", "amflow_kernels.*"]),
    install_requires=["torch>=2.6", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "numpy"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "numpy", "flash-colreduce"],
    },
    license="MIT",
)
