"""Installs mae_jax, data_pipeline and configs, with compatible version ranges.

``pip install .`` gives training, fine-tuning, evaluation, the study and the tools (predict,
embed, export) on local dataset folders, without TensorFlow. Extras: ``[data]`` builds datasets
(TensorFlow and TFDS; also needed to read datasets at a URL), ``[torch]`` imports PyTorch weight
files and runs the transformers parity checks, ``[onnx]`` exports fine-tuned models to ONNX
with a STAC MLM item, ``[test]`` runs the test suite, ``[all]`` is all of them. For a GPU or TPU,
install JAX for it too (``pip install -U "jax[cuda12]"`` or ``"jax[tpu]"``). The exact versions that ``make`` and CI install and test are pinned in
requirements.txt, requirements-parity.txt and requirements-lock.txt.
"""

from setuptools import find_packages
from setuptools import setup

# What the package imports outside the extras (tests/test_without_tensorflow.py checks that
# every range holds the version pinned in requirements-lock.txt).
INSTALL_REQUIRES = [
    'jax>=0.10,<0.12',
    'flax>=0.12,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12,<0.13',
    'numpy>=2.0,<3',
    'ml-collections>=1.1,<2',
    'absl-py>=2.1,<3',
    'etils[epath]>=1.12,<2',
    'tensorboard>=2.18,<3',  # Its event file writer: TensorBoard logs without TensorFlow.
    'matplotlib>=3.9,<4',
    'pillow>=10.4,<14',
    'rasterio>=1.4,<2',  # GeoTIFF scenes in and maps out (mae_jax.tools.predict).
    'safetensors>=0.4.5,<1',  # Weight files (export, config.init_from).
    'pyarrow>=17,<30',  # Parquet embeddings (mae_jax.tools.embed).
    'tqdm>=4.66,<5',
    'google-crc32c>=1.5,<2',  # Record CRCs of the local reader without TensorFlow.
]
EXTRAS_REQUIRE = {
    # Building datasets (data_pipeline.ingest, build_synthetic) and reading them at a URL.
    # TensorFlow only reads and writes files here: its CPU build where there is one.
    'data': [
        'tensorflow-cpu>=2.18,<3; platform_system == "Linux" and platform_machine == "x86_64"',
        'tensorflow>=2.18,<3; platform_system != "Linux" or platform_machine != "x86_64"',
        'tensorflow-datasets>=4.9.7,<5',
        'pystac[validation]>=1.12,<2',  # STAC items as inputs of data_pipeline.ingest.prepare.
    ],
    # Fine-tuned models as ONNX with a STAC MLM item (mae_jax.tools.onnx_export).
    'onnx': [
        'onnx>=1.17,<2',
        'onnxruntime>=1.20,<2',
        'pystac[validation]>=1.12,<2',
    ],
    # PyTorch weight files (.bin, .pth) and the transformers parity checks.
    'torch': [
        'torch>=2.4,<3',
        'transformers>=5,<6',
    ],
}
EXTRAS_REQUIRE['test'] = ['pytest>=8,<10', 'pytest-xdist>=3.5,<4', *EXTRAS_REQUIRE['data'],
                          *EXTRAS_REQUIRE['torch'], *EXTRAS_REQUIRE['onnx']]
EXTRAS_REQUIRE['all'] = sorted(set(EXTRAS_REQUIRE['test']))

# Console commands (what `python -m <module>` runs).
CONSOLE_SCRIPTS = [
    'mae-jax-train = mae_jax.main:console_main',  # Pretraining, fine-tuning, evaluation.
    'mae-jax-study = mae_jax.trainers.study:console_main',
    'mae-jax-predict = mae_jax.tools.predict:console_main',
    'mae-jax-embed = mae_jax.tools.embed:console_main',
    'mae-jax-export = mae_jax.tools.export:console_main',
    'mae-jax-build-dataset = data_pipeline.ingest.build:console_main',
    'mae-jax-inspect-dataset = data_pipeline.ingest.inspect:console_main',
    'mae-jax-synthetic-dataset = data_pipeline.build_synthetic:console_main',
    'mae-jax-prepare = data_pipeline.ingest.prepare:console_main',  # Acquisitions -> input stack.
]

setup(
    name='mae_jax',
    version='0.1.0',
    description='Masked autoencoders (ViT-MAE) for Sentinel-1 SAR in JAX/Flax, pod-scale.',
    packages=find_packages(include=['mae_jax*', 'data_pipeline*', 'configs*']),
    # The STAC extension schemas that ONNX exports validate their MLM item against, offline.
    package_data={'mae_jax.tools': ['schemas/*.json', 'schemas/README.md', 'schemas/LICENSE']},
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={'console_scripts': CONSOLE_SCRIPTS},
)
