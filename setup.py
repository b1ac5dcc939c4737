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
        "libra_worker.etc",
    ],
    # The top-level templates/ and etc/ directories are installed inside the package, where
    # the worker finds its template and scripts/install-service.sh the files it installs.
    package_dir={"libra_worker.templates": "templates", "libra_worker.etc": "etc"},
    package_data={
        "libra_worker.templates": ["*.j2"],
        "libra_worker.etc": ["*.conf", "*.service", "*.socket", "*.target", "*.logrotate",
                             "*.sysctl"],
    },
    # The systemd unit's Documentation= names this file under the virtualenv's prefix.
    data_files=[("share/doc/libra-worker", [
        "README.rst", "docs/operations.rst", "docs/protocol.rst", "docs/security.rst",
        "docs/libra-compat.rst", "docs/benchmarks.rst",
    ])],
    install_requires=[
        "pygearman>=0.2.6",
        "Jinja2>=3.1",
        "python-swiftclient>=4.0",
        "python-daemon>=3.0",
        "cryptography>=41",
    ],
    # build and wheel: tests/unit/test_packaging.py builds the sdist and wheel offline.
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "build>=1", "wheel"]},
    entry_points={
        "console_scripts": [
            "libra-worker = libra_worker.cli:main",
            "libra-client = libra_worker.client:main",
        ]
    },
)
