"""setup.py

Installs the `tga` package and its `tga` command. Versions are pinned exactly: torch must be pinned
in every requirement list, or the resolver swaps the CPU build for a CUDA one or pairs an
incompatible torchvision (see docs/installation.md).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers==5.23.0",
    "deepspeed==0.19.8",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "open_clip_torch==3.3.0",
    "timm==1.0.31",
    "faiss-cpu==1.15.1",
    "peft==0.21.2",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "mistral-common==1.13.1",  # ships the real Mistral-7B tokenizer used by the tiny recipes and tests
    "protobuf==7.36.2",
    "einops==0.8.2",
    "pillow",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "rich==15.0.0",
    "matplotlib==3.11.2",
    "wandb==0.31.0",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "ruff==0.17.5",
        "tensorboard==2.21.0",
    ],
    # `tga serve` (docs/serve.md): the page, its client (the tests drive it) and the headless-browser test's driver.
    # gradio 6.31 needs pillow < 13, which resolves pillow to 12.x here (the demo world renders the same bytes).
    "serve": [
        "gradio==6.31.0",
        "gradio_client==2.7.2",
        "selenium==4.51.0",
    ],
}

setup(
    name="tga",
    version="0.1.0",
    description="Text-Guided vision-language Alignment: LLaVA-style VLM training that keeps the LLM's safety",
    packages=find_packages(include=["tga", "tga.*"]),
    # what an installed `tga demo` reads: the demo's plans and recipes, the demo world's shipped CLIP and LLM
    package_data={"tga": ["py.typed", "demo/configs/*.yaml", "demo/prebuilt/*/*", "cli/script_help/*.txt"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["tga=tga.cli:main"]},
)
