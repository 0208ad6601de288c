"""retro_jax: Retro-Search and tree-CoT distillation for Qwen2-family reasoning models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="retro_jax",
    version="0.1.0",
    description="Retro-Search (Lu et al., 2025) in JAX/Flax NNX: revise R1-style reasoning traces, "
    "build tree-CoT data (MCTS over typed thoughts), serve rollouts through a JetStream-style engine, and fine-tune.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["retro_jax", "retro_jax.*"]),
    package_data={"retro_jax": ["assets/tiny_reasoner/*.json", "assets/tiny_reasoner/*.safetensors",
                              "view/static/*.css", "view/static/*.js"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "etils[epath]",  # checkpoint paths on gs:// and mounts (already installed with orbax-checkpoint)
        "grain>=0.2.10",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "ml-collections>=1.0",
        "sympy>=1.12",
        "math-verify>=0.7",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "jinja2>=3.1",  # chat templates (transformers does not require it)
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch is only the independent reference for parity tests (2.13.0 has a CPU build here); jax[tpu] brings
        # libtpu, which tests/test_plan.py needs to compile for a TPU topology on a CPU machine; nbclient, nbformat
        # and ipykernel execute the CPU Colab notebook (tests/test_demo.py).
        "test": ["pytest>=8", "torch==2.13.0", "jax[tpu]", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        # `retro-jax plan` on any machine, and running on Cloud TPU VMs: libtpu matched to the installed jax.
        "tpu": ["jax[tpu]"],
        # Online benchmark / dataset loading through the HF hub on users' machines.
        "hf": ["datasets>=3.0"],
    },
    entry_points={"console_scripts": ["retro-jax=retro_jax.cli:main"]},
)
