"""Installs mae_jax, data_pipeline and configs. Pinned versions live in requirements.txt."""

import pathlib

from setuptools import find_packages
from setuptools import setup

ROOT = pathlib.Path(__file__).parent


def requirements(name):
  lines = (ROOT / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


setup(
    name='mae_jax',
    version='0.1.0',
    description='Masked autoencoders (ViT-MAE) for Sentinel-1 SAR in JAX/Flax, pod-scale.',
    packages=find_packages(include=['mae_jax*', 'data_pipeline*', 'configs*']),
    python_requires='>=3.10',
    install_requires=requirements('requirements.txt'),
    extras_require={'parity': requirements('requirements-parity.txt')},
)
