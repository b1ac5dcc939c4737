from setuptools import setup

setup(
    name="libra-worker",
    version="1.0.0",
    description="Load-balancer agent: Gearman messages drive a real HAProxy",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "libra_worker",
        "libra_worker.drivers",
        "libra_worker.drivers.haproxy",
        "libra_worker.templates",
    ],
    # The top-level templates/ directory is installed inside the package.
    package_dir={"libra_worker.templates": "templates"},
    package_data={"libra_worker.templates": ["*.j2"]},
    install_requires=[
        "pygearman>=0.2.6",
        "Jinja2>=3.1",
        "python-swiftclient>=4.0",
        "python-daemon>=3.0",
        "cryptography>=41",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "libra-worker = libra_worker.cli:main",
            "libra-client = libra_worker.client:main",
        ]
    },
)
